"""training.run.model_card: the cards of ``model/`` (the adapter's, replacing peft's template) and
``model-merged/`` name the base and the data without an absolute local path, and say how to load
the adapter onto a base kept elsewhere; ``adapter_config.json`` keeps peft's own field."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.training.conftest import base_args, fit

# A path that starts at the file system's root (or the home directory) after a space, a quote,
# a bracket or a backtick: "/tmp/x", "(~/x". trl's metric names ("rewards/chosen") and
# URLs ("https://...") do not match.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(\[])(?:/|~/)[^\s`'\")\]]+", re.M)


def test_cards_name_no_local_path_and_say_how_to_load_onto_a_local_base(tiny_assets, tmp_path):
    out = tmp_path / "run"
    argv = base_args(
        tiny_assets, out, lora=True, merge_adapter=True, max_steps=2, evaluate=True,
        eval_fraction=0.25, num_prompts=2, max_new_tokens=8,
    )  # fmt: skip
    fit(argv)
    adapter_card = (out / "model" / "README.md").read_text()
    merged_card = (out / "model-merged" / "README.md").read_text()
    local = [
        str(tiny_assets.model_dir),
        str(tiny_assets.data_file),
        str(tmp_path),
        str(Path.home()),
    ]
    for card in (adapter_card, merged_card):
        assert ABSOLUTE_PATH.findall(card) == []
        assert not [p for p in local if p in card]
        assert f"base_model: {tiny_assets.model_dir.name}" in card  # the directory's name
        assert "## Before vs after (held-out)" in card and "2 optimizer steps" in card
    assert "library_name: peft" in adapter_card and "library_name: transformers" in merged_card
    # peft's own field stays (peft loads the base from it); the card shows the other way
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).resolve() == tiny_assets.model_dir.resolve()
    assert 'PeftModel.from_pretrained(base, "path/to/model")' in adapter_card
    assert "PeftModel" not in merged_card  # merged weights load alone


def test_the_pattern_finds_absolute_paths():
    found = ABSOLUTE_PATH.findall("base at /tmp/x/model, (~/data.jsonl) and `/srv/m`")
    assert [f.strip(" (`") for f in found] == ["/tmp/x/model,", "~/data.jsonl", "/srv/m"]
    assert ABSOLUTE_PATH.findall("rewards/chosen at https://hf.co/x and path/to/model") == []
