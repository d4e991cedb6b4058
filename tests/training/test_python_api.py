"""``training.train``: trl's keyword names, a ``datasets.Dataset``, settings kept over the
embedded recipe; the README's example runs as written; the model cards it leaves."""

from __future__ import annotations

import re

from datasets import Dataset

from tests.conftest import REPO_ROOT
from tests.training.conftest import preference_rows, read_metrics
from training.base.config import FitConfig, changed_fields
from training.inputs.prepare import apply_embedded_recipe


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- python-api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its Python API example"
    return match.group(1)


def test_the_readme_example_runs_as_written(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_example().replace('"./my-model"', repr(str(tiny_assets.model_dir)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example
    result = scope["result"]
    assert len(result.history) == 3 and result.policy is not None
    card = (tmp_path / "runs" / "notebook" / "model" / "README.md").read_text()
    assert "library_name: peft" in card and "## Before vs after (held-out)" in card
    assert str(tiny_assets.model_dir) not in card and "base_model: model" in card


def test_a_dataset_object_and_trl_names(tiny_assets, tmp_path):
    from training import train

    rows = Dataset.from_list(preference_rows())
    result = train(
        tiny_assets.model_dir,
        rows,
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        loss_type="ipo",
        evaluate=False,
        max_length=64,
        report_to="none",
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert len(result.history) == 2 and result.last_step["loss"] == result.history[-1]["loss"]
    saved = (tmp_path / "config.yaml").read_text()
    assert "loss_type:\n  - ipo" in saved and "batch_size: 4" in saved
    card = (tmp_path / "model" / "README.md").read_text()
    assert "library_name: transformers" in card and "| loss_type | ipo |" in card
    assert "2 optimizer steps" in card


def test_explicit_settings_are_not_replaced_by_the_embedded_recipe():
    cfg = FitConfig()
    cfg.trainer.max_steps = 3  # a config built in Python: what differs from the defaults
    assert changed_fields(cfg) == {"max_steps"}
    recipe = apply_embedded_recipe(cfg, changed_fields(cfg))
    assert recipe.trainer.max_steps == 3 and recipe.trainer.batch_size == 16
