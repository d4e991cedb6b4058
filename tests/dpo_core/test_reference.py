"""dpo_core.reference: three reference sources agree; the cache refuses stale data; guards."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions, split_pairs
from dpo_core.logps import ld_sums
from dpo_core.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    PrecomputedReference,
    check_reference_is_not_policy,
    precompute_reference_logps,
)
from dpo_core.reference_cache import (
    CacheSettings,
    load_reference_cache,
    reference_cache_key,
    save_reference_cache,
)
from tests.dpo_core.oracle import plain_token_logps
from tests.dpo_core.tiny import SPANS, VALUE_TOL, lora_model, make_batch, tiny_llama

torch.set_num_threads(1)

# Summed log-probs of ~10 tokens are O(50); float32's ulp there is ~4e-6.
SUM_TOL = dict(rtol=0.0, atol=3e-5)
OPTIONS = LogpOptions()  # how training scores a reference by default


def logps_of(source, batch, options=OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) of a reference source on ``batch``."""
    out = source(batch, options)
    return out.chosen, out.rejected


def batches(num_batches: int = 2) -> list[PreferenceBatch]:
    """``num_batches`` batches of 3 pairs, rows numbered 0..3·num_batches-1 in shuffled order."""
    order = torch.randperm(3 * num_batches, generator=torch.Generator().manual_seed(0))
    out = []
    for i in range(num_batches):
        batch = make_batch(SPANS, length=10, vocab=128, seed=i)
        out.append(dataclasses.replace(batch, index=order[3 * i : 3 * i + 3]))
    return out


@pytest.fixture(scope="module")
def base_and_peft():
    """A frozen copy of a tiny llama, and the same llama in a LoRA whose B matrices are non-zero
    (so the adapters change the outputs unless switched off)."""
    base = tiny_llama()
    frozen = copy.deepcopy(base)
    return frozen, lora_model(base)


def test_frozen_copy_equals_adapters_off(base_and_peft):
    frozen, peft = base_and_peft
    batch = batches()[0]
    from_copy = logps_of(FrozenCopyReference(frozen), batch, LogpOptions(chunk_size=4))
    from_peft = logps_of(AdapterDisabledReference(peft), batch, LogpOptions(chunk_size=4))
    for a, b in zip(from_copy, from_peft):
        torch.testing.assert_close(a, b, **SUM_TOL)
        assert a.shape == (3,) and not a.requires_grad
    with torch.no_grad():
        adapters_on = split_pairs(plain_token_logps(peft, batch).row_sums())
    assert (adapters_on[0] - from_peft[0]).abs().max() > 1e-2  # the adapters really were off
    assert (peft.base_model.model.lm_head.lora_B.default.weight != 0).any()


def test_frozen_copy_is_frozen_and_ld_alpha_applies(base_and_peft):
    frozen, _ = base_and_peft
    reference = FrozenCopyReference(frozen)
    assert not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    batch = batches()[0]
    with torch.no_grad():
        expected = ld_sums(plain_token_logps(frozen, batch), 0.5)
    for a, b in zip(logps_of(reference, batch, LogpOptions(ld_alpha=0.5)), expected):
        torch.testing.assert_close(a, b, **VALUE_TOL)


def test_precomputed_equals_live(base_and_peft):
    """Precompute over shuffled batches, then look rows up by index, and read batch columns."""
    frozen, _ = base_and_peft
    live = FrozenCopyReference(frozen)
    data = batches()
    chosen, rejected = precompute_reference_logps(live, data, OPTIONS)
    assert chosen.shape == rejected.shape == (6,)
    lookup = PrecomputedReference(chosen, rejected)
    for batch in data:
        want = logps_of(live, batch)
        for got, exp in zip(logps_of(lookup, batch), want):
            assert torch.equal(got, exp)  # the same computation on the same batch
        with_columns = dataclasses.replace(
            batch, ref_chosen_logps=want[0], ref_rejected_logps=want[1], index=None
        )
        assert all(
            torch.equal(g, e) for g, e in zip(logps_of(PrecomputedReference(), with_columns), want)
        )


def test_precompute_refuses_missing_or_repeated_rows(base_and_peft):
    frozen, _ = base_and_peft
    live = FrozenCopyReference(frozen)
    data = batches()
    with pytest.raises(ValueError, match="missing rows"):
        precompute_reference_logps(live, data, OPTIONS, num_rows=7)
    with pytest.raises(ValueError, match="repeated rows"):
        precompute_reference_logps(live, [data[0], data[0]], OPTIONS)
    with pytest.raises(ValueError, match="batch 0 has no index"):
        precompute_reference_logps(live, [dataclasses.replace(data[0], index=None)], OPTIONS)


def test_missing_precomputed_values_are_refused():
    batch = batches()[0]
    with pytest.raises(ValueError, match="no ref_chosen_logps / ref_rejected_logps.*#1962"):
        PrecomputedReference()(batch, OPTIONS)
    half = dataclasses.replace(batch, ref_chosen_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="no ref_rejected_logps"):
        PrecomputedReference()(half, OPTIONS)
    wrong = dataclasses.replace(
        batch, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(3)
    )
    with pytest.raises(ValueError, match="ref_chosen_logps has shape"):
        PrecomputedReference()(wrong, OPTIONS)
    table = PrecomputedReference(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="outside the 4 precomputed rows"):
        table(batch, OPTIONS)  # rows go up to 5
    with pytest.raises(ValueError, match="no index"):
        table(dataclasses.replace(batch, index=None), OPTIONS)


# ------------------------------------------------------------------------------- cache


def key_for(model, tokenizer, **changes) -> str:
    fingerprint = changes.pop("data_fingerprint", "hh-rlhf:abc123")
    settings = dict(
        max_length=1024, truncation_mode="keep_start", dtype=torch.float32, ld_alpha=None
    )
    return reference_cache_key(
        model,
        tokenizer=tokenizer,
        data_fingerprint=fingerprint,
        settings=CacheSettings(**{**settings, **changes}),
    )


def test_cache_round_trip(tmp_path, base_and_peft, tiny_tokenizer):
    frozen, _ = base_and_peft
    chosen, rejected = torch.randn(5), torch.randn(5)
    index = torch.tensor([3, 0, 4, 1, 2])  # stored in any order, loaded in row order
    key = key_for(frozen, tiny_tokenizer)
    path = tmp_path / "ref" / "cache.pt"
    save_reference_cache(path, key, chosen, rejected, index)
    got_c, got_r = load_reference_cache(path, key, 5)
    order = torch.argsort(index)
    assert torch.equal(got_c, chosen[order]) and torch.equal(got_r, rejected[order])


def test_key_changes_with_everything_it_depends_on(base_and_peft, tiny_tokenizer):
    frozen, peft = base_and_peft
    key = key_for(frozen, tiny_tokenizer)
    assert key == key_for(copy.deepcopy(frozen), tiny_tokenizer)  # deterministic
    changed_weights = copy.deepcopy(frozen)
    with torch.no_grad():
        changed_weights.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    other_template = copy.deepcopy(tiny_tokenizer)
    other_template.chat_template = "{{ messages }}"
    variants = {
        "weights": key_for(changed_weights, tiny_tokenizer),
        "peft model": key_for(peft, tiny_tokenizer),
        "chat template": key_for(frozen, other_template),
        "data": key_for(frozen, tiny_tokenizer, data_fingerprint="hh-rlhf:abc124"),
        "max_length": key_for(frozen, tiny_tokenizer, max_length=512),
        "truncation": key_for(frozen, tiny_tokenizer, truncation_mode="keep_end"),
        "dtype": key_for(frozen, tiny_tokenizer, dtype=torch.bfloat16),
        "ld_alpha": key_for(frozen, tiny_tokenizer, ld_alpha=0.5),
        "precision": key_for(frozen, tiny_tokenizer, precision="bf16-mixed"),
    }
    for what, other in variants.items():
        assert other != key, what


@pytest.mark.parametrize("change", ["weights", "data", "max_length"])
def test_stale_cache_is_refused(tmp_path, base_and_peft, tiny_tokenizer, change):
    frozen, _ = base_and_peft
    path = tmp_path / "cache.pt"
    save_reference_cache(
        path, key_for(frozen, tiny_tokenizer), torch.zeros(3), torch.zeros(3), torch.arange(3)
    )
    if change == "weights":
        model = copy.deepcopy(frozen)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)
        new_key = key_for(model, tiny_tokenizer)
    elif change == "data":
        new_key = key_for(frozen, tiny_tokenizer, data_fingerprint="other rows")
    else:
        new_key = key_for(frozen, tiny_tokenizer, max_length=64)
    with pytest.raises(ValueError, match=f"reference cache {path} is stale"):
        load_reference_cache(path, new_key, 3)


def test_mismatched_cache_is_refused(tmp_path):
    path = tmp_path / "cache.pt"
    save_reference_cache(path, "k", torch.zeros(3), torch.zeros(3), torch.arange(3))
    with pytest.raises(ValueError, match="holds 3 rows, the data has 4"):
        load_reference_cache(path, "k", 4)
    save_reference_cache(path, "k", torch.zeros(3), torch.zeros(3), torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match=r"repeated rows \[0\], missing rows \[1\]"):
        load_reference_cache(path, "k", 3)
    save_reference_cache(
        path, "k", torch.tensor([0.0, float("nan"), 1]), torch.zeros(3), torch.arange(3)
    )
    with pytest.raises(ValueError, match="non-finite"):
        load_reference_cache(path, "k", 3)
    torch.save({"chosen": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="format None"):
        load_reference_cache(path, "k", 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_cache(tmp_path / "absent.pt", "k", 3)


def test_unreadable_cache_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cache.pt"
    save_reference_cache(path, "k", torch.zeros(3), torch.zeros(3), torch.arange(3))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"reference cache {path}: unreadable"):
        load_reference_cache(path, "k", 3)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"reference cache {path}: unreadable"):
        load_reference_cache(path, "k", 3)
    torch.save({"format": "dpo-reference-logps-v1", "key": "k"}, path)
    with pytest.raises(ValueError, match="lacks the tensors"):
        load_reference_cache(path, "k", 3)


def test_failed_cache_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import dpo_core.reference_cache

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dpo_core.reference_cache.os, "fsync", full)
    path = tmp_path / "cache.pt"
    with pytest.raises(OSError) as caught:
        save_reference_cache(path, "k", torch.zeros(3), torch.zeros(3), torch.arange(3))
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- guards


def test_policy_as_reference_is_refused(base_and_peft):
    frozen, peft = base_and_peft
    policy = copy.deepcopy(frozen)
    with pytest.raises(ValueError, match="policy object itself.*log 2"):
        check_reference_is_not_policy(policy, policy)
    with pytest.raises(ValueError, match="shares its storage"):
        check_reference_is_not_policy(peft, peft.get_base_model())  # the LoRA's own base
    sharing = copy.deepcopy(frozen)
    sharing.lm_head.weight = policy.lm_head.weight  # one tied tensor is enough
    with pytest.raises(ValueError, match="'lm_head.weight' shares its storage"):
        FrozenCopyReference(sharing, policy=policy)
    check_reference_is_not_policy(policy, copy.deepcopy(policy))  # a real copy is fine
    FrozenCopyReference(copy.deepcopy(policy), policy=policy)


def test_adapter_disabled_needs_a_peft_model():
    with pytest.raises(TypeError, match="needs a peft PeftModel"):
        AdapterDisabledReference(nn.Linear(2, 2))
