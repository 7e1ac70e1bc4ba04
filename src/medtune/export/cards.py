"""Model and dataset cards for a run, as the Hugging Face Hub reads them.

    medtune export card runs/aria --out export/aria        # README.md (model) + datasets/README.md
    text = model_card("runs/aria", repo_id="me/aria-ft-dpo")

The model card's YAML header (base_model, license, language, tags, datasets, pipeline_tag and the
`model-index` results of the run's evaluation) is built with `huggingface_hub.ModelCardData`; the body
lists the training stages and their hyper-parameters from `manifest.json`, the evaluation of each
stage, how to run the model (transformers, `medtune serve`, llama.cpp, Ollama), intended use, limits
and the medical disclaimer. The dataset card is `medtune.data.cards`' (helper of the data layer), one
per dataset of the run (sft, dpo, test), merged into one README with one Hub config per dataset.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, EvalResult, ModelCard, ModelCardData

from medtune import __version__
from medtune.errors import ModelError
from medtune.export.runs import read_manifest
from medtune.io import write_text

# Hyper-parameters shown per stage (StageConfig keys), in this order.
_HPARAMS = ("method", "learning_rate", "max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps",
            "scheduler", "warmup_steps", "optimizer", "max_length", "beta", "loss_type")  # fmt: skip
_DISCLAIMER = (
    "**Medical disclaimer.** This model is a research and engineering artefact. It is not a medical device, "
    "has not been clinically validated, and must not be used to diagnose, triage or treat anyone without "
    "review by a qualified health professional. Its answers can be wrong with high confidence."
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " + ".join(map(_fmt, value))
    return str(value)


def _final_stage(manifest: dict[str, Any]) -> str | None:
    stages = (manifest.get("recipe") or {}).get("train", {}).get("stages") or []
    done = [s for s in stages if (manifest.get("steps") or {}).get(s, {}).get("status") == "complete"]
    return done[-1] if done else None


def _eval_models(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return ((manifest.get("steps") or {}).get("eval") or {}).get("models") or {}


def eval_results(manifest: dict[str, Any], model_name: str) -> list[EvalResult]:
    """model-index entries: every scalar metric of the run's final model on its held-out test set."""
    models = _eval_models(manifest)
    final = _final_stage(manifest)
    metrics = (models.get(final or "") or {}).get("metrics") or {}
    task = (manifest.get("recipe") or {}).get("task") or "custom"
    cases = ((manifest.get("steps") or {}).get("eval") or {}).get("test_cases")
    return [
        EvalResult(
            task_type="text-generation",
            task_name=f"{task} (medtune task pack)",
            dataset_type=f"medtune/{task}-test",
            dataset_name=f"{task} held-out test set" + (f" ({cases} cases)" if cases else ""),
            metric_type=name,
            metric_name=name.replace("_", " "),
            metric_value=round(float(value), 4),
        )
        for name, value in metrics.items()
        if name != "n" and isinstance(value, int | float)
    ]


def _stage_table(manifest: dict[str, Any]) -> list[str]:
    recipe = manifest.get("recipe") or {}
    stages = recipe.get("train", {}).get("stages") or []
    lines = ["| stage | " + " | ".join(_HPARAMS) + " | LoRA r / alpha | train records | train loss |",
             "|---" * (len(_HPARAMS) + 4) + "|"]  # fmt: skip
    for stage in stages:
        cfg = recipe.get("train", {}).get(stage) or {}
        step = (manifest.get("steps") or {}).get(stage) or {}
        lora = cfg.get("lora") or {}
        shown = [
            _fmt(cfg.get(k, "")) if not (k in ("beta", "loss_type") and stage != "dpo") else ""
            for k in _HPARAMS
        ]
        lora_text = (
            f"{lora.get('r')} / {lora.get('alpha')}" if cfg.get("method") in ("lora", "qlora") else "-"
        )
        loss = (step.get("metrics") or {}).get("train_loss")
        lines.append(f"| {stage} | " + " | ".join(shown) + f" | {lora_text} | {step.get('train_records', '')} | "
                     f"{_fmt(loss) if loss is not None else ''} |")  # fmt: skip
    return lines


def _eval_table(manifest: dict[str, Any]) -> list[str]:
    models = _eval_models(manifest)
    if not models:
        return ["No evaluation was recorded for this run."]
    names = sorted({k for m in models.values() for k, v in (m.get("metrics") or {}).items()
                    if k != "n" and isinstance(v, int | float)})  # fmt: skip
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, record in models.items():
        metrics = record.get("metrics") or {}
        lines.append(f"| {model} | " + " | ".join(_fmt(metrics.get(k, "")) for k in names) + " |")
    return lines


def model_card(
    run_dir: str | Path, *, repo_id: str | None = None, gguf_files: list[Path] | None = None
) -> str:
    """The README.md of the run's final model (see the module docstring)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = manifest.get("recipe") or {}
    model_cfg = recipe.get("model") or {}
    export = recipe.get("export") or {}
    hub = export.get("hub") or {}
    task = recipe.get("task")
    final = _final_stage(manifest)
    if final is None:
        raise ModelError(
            f"{run_dir}: no completed training stage to describe; run `medtune run RECIPE` first"
        )
    name = repo_id or hub.get("model_repo") or f"{manifest.get('name', run_dir.name)}-{final}"
    base = model_cfg.get("base")
    embedded = base in (None, "embedded")
    stages = recipe.get("train", {}).get("stages") or []
    methods = {(recipe.get("train", {}).get(s) or {}).get("method") for s in stages}
    tags = ["medtune", "medical", *stages, *sorted(m for m in methods if m in ("lora", "qlora"))]
    if task:
        tags.append(task)
    if gguf_files:
        tags.append("gguf")
    data = ModelCardData(
        base_model=None if embedded else base,
        license=export.get("license"),
        language=export.get("language"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[hub["dataset_repo"]] if hub.get("dataset_repo") else None,
        model_name=name,
        eval_results=eval_results(manifest, name) or None,
    )
    system = model_cfg.get("system_prompt")
    if not system and task:
        from medtune.tasks import get_task

        system = get_task(task).system_prompt
    base_text = (
        "the small Llama-architecture model medtune builds and trains from scratch on the run's own data "
        f"(`model.embedded`: {model_cfg.get('embedded', {}).get('size', 'small')})"
        if embedded
        else f"[`{base}`](https://huggingface.co/{base})"
    )
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from {base_text} with medtune {__version__}: "
        + " → ".join(stages)
        + (f", for the **{task}** task." if task else "."),
        "",
        "## Training",
        "",
        *_stage_table(manifest),
        "",
        f"Seed {recipe.get('seed')}. Chat template: the tokenizer's own"
        + (f" (`{model_cfg['chat_template']}`)" if model_cfg.get("chat_template") else "")
        + "; the same template formats training, serving, GGUF metadata and the Ollama Modelfile.",
        "",
        "## Evaluation",
        "",
        *_eval_table(manifest),
        "",
        "## How to use",
        "",
        "```bash",
        f"medtune serve --model {name}      # OpenAI-compatible, structured answers constrained to the schema",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
    ]
    if gguf_files:
        lines += ["", "GGUF files for llama.cpp and Ollama:", ""]
        lines += [f"- `{p.name}` ({p.stat().st_size / 1e6:.1f} MB)" for p in gguf_files]
    if system:
        lines += ["", "System prompt used in training and serving:", "", "```text", system, "```"]
    lines += [
        "",
        "## Intended use and limits",
        "",
        "Built to answer the one task it was trained on, in the format above, inside a larger system that "
        "checks its answers. It knows nothing beyond its training data"
        + (" (synthetic cases generated by rules)" if (recipe.get("data") or {}).get("generate") else "")
        + " and will answer confidently outside it.",
        "",
        _DISCLAIMER,
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


# --------------------------------------------------------------------------------------------------
# Datasets


def dataset_bundle(run_dir: str | Path, out_dir: str | Path, *, name: str | None = None) -> Path:
    """Copy the run's datasets into `out_dir/<dataset>/<split>.jsonl` and write one README.md card
    (one Hub config per dataset: sft, dpo, pt, test) built from `medtune.data.cards`."""
    from medtune.data.cards import collect_splits, dataset_card, size_category

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_manifest(run_dir)
    recipe = manifest.get("recipe") or {}
    export = recipe.get("export") or {}
    files = manifest.get("data_files") or {}
    if not files:
        raise ModelError(f"{run_dir}: the manifest lists no data files (the data step has not run)")
    groups: dict[str, list[Path]] = {}
    for key, info in sorted(files.items()):
        group, _, split = key.partition(".")
        target = out_dir / group / f"{split or 'test'}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / info["path"], target)
        groups.setdefault(group, []).append(target)
    name = (
        name or export.get("hub", {}).get("dataset_repo") or f"{manifest.get('name', run_dir.name)}-datasets"
    )
    readme = out_dir / "README.md"
    reports = {group: collect_splits(paths) for group, paths in groups.items()}
    license_, language = export.get("license") or "apache-2.0", export.get("language")
    cards = {
        group: DatasetCard(
            dataset_card(splits, readme, name=f"{name} / {group}", license=license_, language=language)
        )
        for group, splits in reports.items()
    }
    data = next(iter(cards.values())).data
    data.configs = [{**card.data.configs[0], "config_name": group} for group, card in cards.items()]
    data.tags = sorted({t for card in cards.values() for t in (card.data.tags or [])})
    total = sum(len(r.records) for splits in reports.values() for r in splits.values())
    data.size_categories = [size_category(total)]
    data.pretty_name = name
    body = [f"# {name}", "", f"The datasets of the medtune run `{manifest.get('name')}`, one config each: "
            + ", ".join(f"`{g}`" for g in groups) + ".", ""]  # fmt: skip
    for card in cards.values():
        body.append(re.sub(r"^(#+) ", r"#\1 ", card.text.strip(), flags=re.M))  # one heading level down
        body.append("")
    write_text(readme, str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))))
    return readme


def write_cards(run_dir: str | Path, out_dir: str | Path, *, repo_id: str | None = None,
                gguf_files: list[Path] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """`out_dir/README.md` (model card) and `out_dir/datasets/` (data files + dataset card)."""
    out_dir = Path(out_dir)
    model_readme = write_text(
        out_dir / "README.md", model_card(run_dir, repo_id=repo_id, gguf_files=gguf_files)
    )
    return model_readme, dataset_bundle(run_dir, out_dir / "datasets")
