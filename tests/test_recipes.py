"""The shipped recipes (recipes/*.yaml), their sample data and the accelerate configs.

Every recipe must pass `medtune validate` from any directory, keep the seed projects' hyper-parameters,
name LoRA target modules that exist in its base architecture, and point at sample data that reads
without a bad line. The accelerate configs must be files `accelerate launch` accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune.cli import main
from medtune.config import load_recipe, validate_recipe_file
from medtune.data.files import read_file
from medtune.train.prepare import STAGE_KINDS, resolve_data_path, stage_source

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHIPPED = {
    "aria",
    "aria-medgemma",
    "derm-flan-t5",
    "doctis-phi3",
    "doctis-tinyllama",
    "headache",
    "headache-biomistral",
    "mymedicalgpt-qwen",
}


def recipe(name: str, overrides: list[str] | None = None):
    return load_recipe(RECIPES / f"{name}.yaml", overrides)


def test_the_shipped_recipes_are_all_there() -> None:
    assert {p.stem for p in RECIPES.glob("*.yaml")} == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_recipe_validates_from_any_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative dataset paths resolve beside the recipe
    assert validate_recipe_file(RECIPES / f"{name}.yaml") == []
    assert main(["validate", str(RECIPES / f"{name}.yaml")]) == 0


def test_validate_catches_a_missing_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    path = RECIPES / "mymedicalgpt-qwen.yaml"
    problems = validate_recipe_file(path, ["data.sft=nowhere/qa.jsonl", "train.dpo.data=gone.jsonl"])
    assert problems == [
        "data.sft: file not found: nowhere/qa.jsonl",
        "train.dpo.data: file not found: gone.jsonl",
    ]
    assert main(["validate", str(path), "data.sft=nowhere/qa.jsonl"]) == 2
    assert "data.sft: file not found: nowhere/qa.jsonl" in capsys.readouterr().err


def test_aria_medgemma_keeps_the_seed_hyperparameters() -> None:
    r = recipe("aria-medgemma")
    assert r.model.base == "google/medgemma-4b-it" and r.train.stages == ["sft", "dpo"]
    sft, dpo = r.train.sft, r.train.dpo
    assert (sft.method, sft.qlora.quant_type, sft.lora.r, sft.lora.alpha) == ("qlora", "nf4", 32, 64)
    assert (sft.learning_rate, sft.max_steps, sft.merge) == (2e-4, 560, True)
    assert (dpo.method, dpo.qlora.quant_type, dpo.lora.r, dpo.lora.alpha) == ("qlora", "nf4", 16, 32)
    assert (dpo.learning_rate, dpo.beta, dpo.max_steps, dpo.merge) == (2e-5, 0.2, 135, True)
    assert (r.data.generate.sft, r.data.generate.dpo) == (1500, 420)


@pytest.mark.parametrize("name", ["doctis-phi3", "doctis-tinyllama"])
def test_doctis_recipes_keep_the_seed_hyperparameters(name: str) -> None:
    r = recipe(name)
    sft = r.train.sft
    assert (sft.method, sft.lora.r, sft.lora.alpha, sft.lora.dropout) == ("qlora", 16, 32, 0.05)
    assert (sft.num_epochs, sft.learning_rate, sft.scheduler, sft.optimizer) == (
        3,
        2e-4,
        "cosine",
        "paged_adamw_8bit",
    )
    assert sft.format == "alpaca" and r.model.system_prompt.startswith("Tu es Doctis AI")
    assert "q4_k_m" in r.export.gguf.quantizations


def test_derm_recipe_is_a_seq2seq_lora_adapter_on_q_and_v() -> None:
    r = recipe("derm-flan-t5")
    sft = r.train.sft
    assert r.model.kind == "seq2seq"
    assert (sft.method, sft.lora.r, sft.lora.alpha, sft.lora.target_modules, sft.merge) == (
        "lora",
        8,
        32,
        ["q", "v"],
        False,
    )


def test_mymedicalgpt_runs_pt_then_sft_then_dpo_on_its_three_file_formats() -> None:
    r = recipe("mymedicalgpt-qwen")
    assert r.train.stages == ["pt", "sft", "dpo"] and r.train.pt.enabled
    formats = {
        stage: read_file(resolve_data_path(stage_source(r, stage)[1], RECIPES, stage)).format
        for stage in r.train.stages
    }
    assert formats == {"pt": "text", "sft": "sharegpt", "dpo": "medicalgpt_preference"}


def _architecture(name: str):
    """A tiny randomly initialised model of the recipe's base architecture (nothing downloaded)."""
    import transformers as tf

    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 64,
    }
    if name == "doctis-phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0))
    if name == "doctis-tinyllama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=1))
    if name == "headache-biomistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=1))
    return tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
    )


@pytest.mark.parametrize("name", ["doctis-phi3", "doctis-tinyllama", "headache-biomistral", "derm-flan-t5"])
def test_lora_target_modules_exist_in_the_base_architecture(name: str) -> None:
    import torch

    targets = recipe(name).train.sft.lora.target_modules
    linear = {
        n.rsplit(".", 1)[-1] for n, m in _architecture(name).named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(targets) <= linear, (
        f"{name}: {sorted(set(targets) - linear)} are not linear layers of the model"
    )


SAMPLES = [
    ("doctis-tinyllama", "sft"),
    ("derm-flan-t5", "sft"),
    ("mymedicalgpt-qwen", "pt"),
    ("mymedicalgpt-qwen", "sft"),
    ("mymedicalgpt-qwen", "dpo"),
]


@pytest.mark.parametrize(("name", "stage"), SAMPLES)
def test_sample_data_reads_without_a_bad_line(name: str, stage: str) -> None:
    r = recipe(name)
    key, value = stage_source(r, stage)
    report = read_file(resolve_data_path(value, RECIPES, key), r.stage(stage).format)
    assert report.ok, report.problems
    assert report.kind == STAGE_KINDS[stage] and len(report.records) >= 20


ACCELERATE = {
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed-zero2.yaml": "DEEPSPEED",
    "deepspeed-zero3.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize(("file", "kind"), sorted(ACCELERATE.items()))
def test_accelerate_configs_are_accepted_by_accelerate_launch(file: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = RECIPES / "accelerate" / file
    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert config.distributed_type.name == kind
    # `accelerate launch` copies the nested sections onto its own options: each key must be one of them.
    options = vars(launch_command_parser().parse_args(["--config_file", str(path), "-m", "medtune.cli"]))
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert key in options, f"{file}: {key} is not an accelerate launch option"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(file[-6])
    text = path.read_text(encoding="utf-8")
    assert (
        f"accelerate launch --config_file recipes/accelerate/{file}" in text
        and "-m medtune.cli train" in text
    )
