"""The training commands: `medtune run`, `medtune train`, `medtune merge` (medtune.train.cli)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medtune.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ARIA = str(RECIPES / "aria.yaml")
TINY_SFT = [
    "model.embedded.size=tiny",
    "train.stages=[sft]",
    "data.generate.sft=32",
    "data.generate.test=4",
    "train.sft.max_steps=2",
    "train.sft.batch_size=8",
    "train.sft.validation_split=0",
    "serve.max_batch_size=4",
]


def test_run_prints_the_training_and_evaluation_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", ARIA, *TINY_SFT, f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "aria: training" in out and "aria: aria on 4 held-out cases" in out
    assert "pathology_exact_match" in out and "trained" in out
    assert "FAIL" in out  # two steps of training do not reach the recipe's 95% target
    manifest = json.loads((tmp_path / "aria" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "complete" and list(manifest["steps"]["eval"]["models"]) == ["base", "sft"]
    # A second run reuses everything and says so.
    assert main(["run", ARIA, *TINY_SFT, f"output_dir={tmp_path}"]) == 0
    assert "reused" in capsys.readouterr().out


def test_recipe_errors_exit_2_with_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", ARIA, "train.sft.lerning_rate=0.1", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.sft.lerning_rate: unknown key; did you mean 'learning_rate'?" in err
    assert main(["train", ARIA, "--stage", "pt", f"output_dir={tmp_path}"]) == 2
    assert "--stage pt: not a stage of this recipe (train.stages: sft, dpo)" in capsys.readouterr().err
    assert main(["train", ARIA, f"output_dir={tmp_path}"]) == 2
    assert "medtune train: --stage is required" in capsys.readouterr().err
    assert main(["run", ARIA, f"output_dir={tmp_path}", "oops"]) == 2
    assert "unexpected argument(s) oops; overrides are KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "aria").exists()


def test_options_may_follow_the_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", ARIA, TINY_SFT[0], "--stage", "sft", *TINY_SFT[1:], f"output_dir={tmp_path}"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "aria" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["recipe"]["model"]["embedded"]["size"] == "tiny"
    assert manifest["steps"]["sft"]["metrics"]["global_step"] == 2 and "eval" not in manifest["steps"]
    assert "aria: training" in capsys.readouterr().out


def test_merge_command_writes_a_standalone_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Random B matrices (init_lora_weights=False) so the adapter changes the outputs.
    peft = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(tmp_path / "adapter"),
                "--base",
                str(tiny_model_dir),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 9, 17, 23, 42]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
        assert not torch.allclose(
            merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        )


def test_python_dash_m_entry_point_for_accelerate_launch() -> None:
    """`accelerate launch ... -m medtune.cli train ...` runs the module: it must be a working entry point."""
    done = subprocess.run(
        [sys.executable, "-m", "medtune.cli", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--stage {pt,sft,dpo}" in done.stdout and "--resume" in done.stdout


@pytest.mark.slow
def test_accelerate_launch_runs_a_stage(tmp_path: Path) -> None:
    """The documented multi-GPU command, with one CPU process (what this machine can run)."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**os.environ, "ACCELERATE_CONFIG_FILE": "/dev/null"}
    cmd = [launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "medtune.cli", "train", ARIA, "--stage", "sft", *TINY_SFT,
           f"output_dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "aria" / "manifest.json").read_text(encoding="utf-8"))
    assert (
        manifest["steps"]["sft"]["status"] == "complete"
        and manifest["steps"]["sft"]["metrics"]["global_step"] == 2
    )
