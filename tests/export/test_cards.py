"""Model and dataset cards of a run: Hub YAML header, the run's metrics, stages and disclaimer."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medtune.export.cards import write_cards


def _split(text: str) -> tuple[dict, str]:
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_model_card_carries_the_runs_metrics_and_training(tiny_run_dir: Path, tmp_path: Path):
    manifest = json.loads((tiny_run_dir / "manifest.json").read_text())
    dpo_metrics = manifest["steps"]["eval"]["models"]["dpo"]["metrics"]
    model_readme, _ = write_cards(tiny_run_dir, tmp_path / "card")
    header, body = _split(model_readme.read_text(encoding="utf-8"))

    assert header["license"] == "apache-2.0" and header["language"] == ["fr"]
    assert header["pipeline_tag"] == "text-generation"
    assert header["datasets"] == ["medtune-test/aria-datasets"]
    assert {"medtune", "medical", "aria", "sft", "dpo", "lora"} <= set(header["tags"])
    assert "base_model" not in header  # the embedded model is no hub model
    results = header["model-index"][0]["results"][0]
    reported = {m["type"]: m["value"] for m in results["metrics"]}
    assert reported["pathology_exact_match"] == round(dpo_metrics["pathology_exact_match"], 4)
    assert reported["json_valid"] == round(dpo_metrics["json_valid"], 4)
    assert "8 cases" in results["dataset"]["name"]

    sft = manifest["recipe"]["train"]["sft"]
    assert f"| sft | lora | {sft['learning_rate']:.4g} |" in body
    assert f"{sft['lora']['r']} / {sft['lora']['alpha']}" in body
    for stage in ("base", "sft", "dpo"):
        assert f"| {stage} |" in body  # evaluation table row per model
    assert "Medical disclaimer" in body and "not a medical device" in body


def test_dataset_card_has_one_config_per_dataset_with_its_files(tiny_run_dir: Path, tmp_path: Path):
    _, datasets = write_cards(tiny_run_dir, tmp_path / "card")
    header, body = _split(datasets.read_text(encoding="utf-8"))
    configs = {c["config_name"]: c["data_files"] for c in header["configs"]}
    assert set(configs) == {"sft", "dpo", "test"}
    for files in configs.values():
        for f in files:
            assert (datasets.parent / f["path"]).is_file()
    assert {s["split"] for s in configs["sft"]} == {"train", "validation"}
    lines = (datasets.parent / "test" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    assert "Label balance" in body
