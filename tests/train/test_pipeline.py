"""The recipe pipeline (medtune.train.pipeline): steps in order, manifest, skipping, --from, one stage.

Every run here is the aria recipe shrunk by overrides (tiny model, a few dozen examples, a few steps),
so a whole pipeline takes seconds. One finished run is shared by the module; tests that change it
work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medtune.config import load_recipe, recipe_to_dict
from medtune.errors import ConfigError, DataError
from medtune.io import sha256_file
from medtune.train.pipeline import run_pipeline

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = [
    "model.embedded.size=tiny",
    "data.generate.sft=48",
    "data.generate.dpo=24",
    "data.generate.test=4",
    "train.sft.max_steps=4",
    "train.sft.batch_size=8",
    "train.sft.eval_steps=4",
    "train.sft.save_steps=4",
    "train.sft.validation_split=0.125",
    "train.dpo.max_steps=2",
    "train.dpo.batch_size=4",
    "train.dpo.eval_steps=2",
    "train.dpo.save_steps=2",
    "train.dpo.validation_split=0.125",
    "serve.max_batch_size=4",
]
STEPS = ["data", "model", "sft", "dpo", "eval"]


def tiny_aria(out: Path, *extra: str):
    return load_recipe(RECIPES / "aria.yaml", [*TINY, f"output_dir={out}", *extra])


def run(out: Path, *extra: str, **kwargs):
    return run_pipeline(tiny_aria(out, *extra), recipe_dir=RECIPES, **kwargs)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one complete tiny aria run (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("runs")
    result = run(out)
    assert result.ran == STEPS
    return out


@pytest.fixture
def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


def test_pipeline_runs_end_to_end_and_writes_the_manifest(finished: Path) -> None:
    run_dir = finished / "aria"
    m = manifest(run_dir)
    assert m["status"] == "complete" and m["wall_seconds"] >= 0
    assert [s for s in STEPS if m["steps"][s]["status"] == "complete"] == STEPS
    assert m["recipe"] == recipe_to_dict(tiny_aria(finished))
    assert {"torch", "transformers", "trl", "peft", "python"} <= set(m["versions"])
    # Data file hashes are those of the files on disk; the held-out test set has its own seed.
    for entry in m["data_files"].values():
        assert sha256_file(run_dir / entry["path"]) == entry["sha256"]
    assert m["steps"]["data"]["plan"]["test"]["generate"] == {"n": 4, "seed": 2}
    # Per-stage metrics, and stage folders holding standalone models.
    for stage, steps in (("sft", 4), ("dpo", 2)):
        record = m["steps"][stage]
        assert record["metrics"]["global_step"] == steps
        assert {"train_loss", "eval_loss", "train_runtime_s"} <= set(record["metrics"])
        assert (run_dir / stage / "model.safetensors").is_file()
        assert not (run_dir / stage / "adapter_config.json").exists()
        assert (run_dir / record["loss_curve"]).stat().st_size > 0
    assert m["steps"]["dpo"]["input"] == "sft"
    # Base vs SFT vs DPO on the test set, decoded under the task's JSON schema (an untrained model
    # rambles inside the justification string until max_tokens, so validity is not asserted here).
    models = m["steps"]["eval"]["models"]
    assert list(models) == ["base", "sft", "dpo"]
    for name, record in models.items():
        assert 0.0 <= record["metrics"]["pathology_exact_match"] <= record["metrics"]["json_valid"] <= 1.0
        rows = [
            json.loads(line)
            for line in (run_dir / record["predictions"]).read_text(encoding="utf-8").splitlines()
        ]
        assert len(rows) == 4, name
        assert all(r["prediction"].startswith('{"pathologie": "') for r in rows), name
    assert m["steps"]["eval"]["test_cases"] == 4
    # The last model is checked against the targets (the recipe's 95% is far off after 2 DPO steps)
    # and the run report is written.
    targets = {t["metric"]: t for t in m["targets"]}
    assert (
        targets["pathology_exact_match"]["threshold"] == 0.95
        and targets["pathology_exact_match"]["passed"] is False
    )
    assert (run_dir / m["steps"]["eval"]["report"]).name == "report.md"
    assert (run_dir / m["steps"]["eval"]["report"]).is_file()


def test_split_and_test_set_do_not_overlap(finished: Path) -> None:
    data = finished / "aria" / "data"

    def users(name: str, key: str = "messages") -> set[str]:
        rows = [json.loads(line) for line in (data / name).read_text(encoding="utf-8").splitlines()]
        return {next(m["content"] for m in r[key] if m["role"] == "user") for r in rows}

    train, val, test = users("sft.train.jsonl"), users("sft.validation.jsonl"), users("test.jsonl")
    assert (len(train), len(val), len(test)) == (42, 6, 4)
    assert not train & val and not test & (train | val)


def test_rerun_skips_completed_steps(copy_of: Path) -> None:
    weights = copy_of / "aria" / "sft" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = run(copy_of)
    assert result.ran == [] and result.skipped == STEPS
    assert weights.stat().st_mtime_ns == before
    assert all(manifest(copy_of / "aria")["steps"][s]["reused"] for s in STEPS)


def test_changed_stage_settings_rerun_that_stage_and_what_follows(copy_of: Path) -> None:
    result = run(copy_of, "train.dpo.beta=0.3")
    assert result.skipped == ["data", "model", "sft"]
    assert result.ran == ["dpo", "eval"]
    m = manifest(copy_of / "aria")
    assert m["recipe"]["train"]["dpo"]["beta"] == 0.3
    assert m["steps"]["sft"]["reused"] and not m["steps"]["dpo"].get("reused")


def test_from_restarts_at_the_named_step(copy_of: Path) -> None:
    result = run(copy_of, from_step="sft")
    assert result.skipped == ["data", "model"]
    assert result.ran == ["sft", "dpo", "eval"]
    with pytest.raises(
        ConfigError, match="--from pretrain: unknown step; the steps of this recipe are data, model"
    ):
        run(copy_of, from_step="pretrain")


def test_train_one_stage(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--stage dpo: trains on the output of stage sft, which is not trained yet"
    ):
        run(tmp_path, stage="dpo")
    assert not (tmp_path / "aria").exists()  # refused before any work
    result = run(tmp_path, stage="sft")
    assert result.ran == ["data", "model", "sft"]  # no dpo, no eval
    assert (tmp_path / "aria" / "sft" / "model.safetensors").is_file()
    assert run(tmp_path, stage="dpo").ran == ["dpo"]
    # The sft output no longer matches a changed recipe: dpo refuses to train on it.
    with pytest.raises(ConfigError, match="stage sft, which is out of date"):
        run(tmp_path, "train.sft.learning_rate=0.01", stage="dpo")


def test_lora_stage_is_merged_into_a_standalone_model(tmp_path: Path) -> None:
    result = run(tmp_path, "train.stages=[sft]", "train.sft.method=lora", "train.sft.lora.r=4", stage="sft")
    assert result.ran == ["data", "model", "sft"]
    record = manifest(tmp_path / "aria")["steps"]["sft"]
    assert record["merged"] and not record["is_adapter"]
    assert not (tmp_path / "aria" / "sft" / "adapter_config.json").exists()
    assert (tmp_path / "aria" / "sft" / "model.safetensors").is_file()


def test_unmerged_adapter_cannot_feed_a_later_stage(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.sft\.merge: is false, but stage dpo trains on sft's output"
    ):
        run(tmp_path, "train.sft.method=lora", "train.sft.merge=false")
    assert not (tmp_path / "aria").exists()  # refused before any work


def test_user_files_with_a_system_prompt(tmp_path: Path) -> None:
    """The Doctis recipe (alpaca file + system prompt) on the embedded model: no task, so no eval."""
    recipe = load_recipe(
        RECIPES / "doctis-tinyllama.yaml",
        [
            f"output_dir={tmp_path}",
            "model.base=embedded",
            "model.embedded.size=tiny",
            "train.sft.method=full",
            "train.sft.optimizer=adamw",
            "train.sft.precision=auto",
            "train.sft.max_steps=2",
        ],
    )
    result = run_pipeline(recipe, recipe_dir=RECIPES)
    assert result.ran == ["data", "model", "sft"]
    rows = (
        (tmp_path / "doctis-tinyllama" / "data" / "sft.train.jsonl").read_text(encoding="utf-8").splitlines()
    )
    first = json.loads(rows[0])["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[0]["content"].startswith("Tu es Doctis AI")
    assert "eval" not in manifest(tmp_path / "doctis-tinyllama")["steps"]


def test_a_bad_dataset_line_fails_the_data_step_and_is_recorded(tmp_path: Path) -> None:
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"instruction": "Q?", "output": "A."}\n{"instruction": "Q2?"\n', encoding="utf-8")
    recipe = load_recipe(
        RECIPES / "doctis-tinyllama.yaml",
        [f"output_dir={tmp_path}", "model.base=embedded", "train.sft.method=full", f"data.sft={bad}"],
    )
    with pytest.raises(DataError, match=r"qa\.jsonl:2"):
        run_pipeline(recipe, recipe_dir=RECIPES)
    m = manifest(tmp_path / "doctis-tinyllama")
    assert m["status"] == "failed"
    assert m["steps"]["data"]["status"] == "failed" and "qa.jsonl:2" in m["steps"]["data"]["error"]


def test_an_interrupted_stage_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C during SFT leaves the manifest saying so; `--resume` continues from the last checkpoint."""
    from transformers import TrainerCallback

    import medtune.train.sft as sft

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 3:
                raise KeyboardInterrupt

    real = sft.train_sft
    monkeypatch.setattr(sft, "train_sft", lambda *a, **kw: real(*a, callbacks=[CtrlC()], **kw))
    only_sft = ["train.stages=[sft]", "train.sft.save_steps=2"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *only_sft)
    m = manifest(tmp_path / "aria")
    assert m["status"] == "interrupted" and m["steps"]["sft"]["status"] == "interrupted"

    monkeypatch.undo()
    with caplog.at_level("INFO"):
        result = run(tmp_path, *only_sft, stage="sft", resume=True)
    assert result.ran == ["sft"]  # data and model were complete before the interruption
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert manifest(tmp_path / "aria")["steps"]["sft"]["metrics"]["global_step"] == 4
