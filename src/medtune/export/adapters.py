"""Adapter-only export (the 10-50 MB LoRA folder of seed 002) and adapter fusion into the base model.

    medtune export adapter runs/derm --out adapters/derm               # the run's LoRA adapter alone
    medtune export adapter adapters/derm --fuse --out models/derm      # fused: a standalone model
    path = export_adapter("runs/derm", "adapters/derm", stage="sft")

A run keeps a stage's adapter in `<run>/<stage>` when the stage is not merged (`train.<stage>.merge:
false`), else beside its checkpoints in `<run>/train/<stage>/adapter`. The export copies the adapter
weights and config, the tokenizer saved with it (it carries the chat template), and writes a small
card naming the base. Fusion is `medtune.train.merge.merge_adapter` (PEFT's merge_and_unload): the
fused model serves without the adapter indirection and converts to GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from medtune.errors import ModelError
from medtune.export.gguf import human_size
from medtune.export.runs import is_adapter_dir, read_manifest
from medtune.io import atomic_dir

# What an adapter folder needs to be loaded (PEFT) and to chat (tokenizer + template); checkpoints and
# optimizer states are left behind.
_KEEP = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json",
         "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "added_tokens.json")  # fmt: skip


def find_adapter(source: str | Path, stage: str | None = None) -> Path:
    """The adapter folder of `source`: an adapter folder itself, or a run's stage (default: the last)."""
    source = Path(source)
    if is_adapter_dir(source):
        return source
    manifest = read_manifest(source)
    stages = (manifest.get("recipe") or {}).get("train", {}).get("stages") or []
    steps = manifest.get("steps") or {}
    name = stage or next((s for s in reversed(stages) if steps.get(s, {}).get("status") == "complete"), None)
    record = steps.get(name or "", {})
    if record.get("status") != "complete":
        raise ModelError(f"{source}: stage {name or '(none)'} is not trained in this run")
    candidates = [source / record.get("output", name)]
    if record.get("work_dir"):
        candidates.append(source / record["work_dir"] / "adapter")
    for folder in candidates:
        if is_adapter_dir(folder):
            return folder
    raise ModelError(
        f"{source}: stage {name} was trained with method={record.get('method')}, so it has no adapter; "
        f"set train.{name}.method=lora to get one"
    )


def _base_of(adapter: Path) -> str:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path") or "")


def export_adapter(source: str | Path, out_dir: str | Path, *, stage: str | None = None) -> Path:
    """Copy the adapter (weights, config, tokenizer) to `out_dir` with a card; atomic."""
    adapter = find_adapter(source, stage)
    base = _base_of(adapter)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name in _KEEP:
            if (adapter / name).is_file():
                shutil.copyfile(adapter / name, tmp / name)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        local_base = base.startswith(("/", ".")) or Path(base).exists()
        data = ModelCardData(library_name="peft", base_model=None if local_base else base,
                             tags=["medtune", "lora", "medical"], pipeline_tag="text-generation")  # fmt: skip
        body = [
            f"# LoRA adapter ({human_size(size)})",
            "",
            f"Trained with medtune on the base model `{base}`"
            + (" (a local folder: the run's model; ship it with the adapter)." if local_base else "."),
            "",
            "```bash",
            f"medtune serve --model BASE --adapter {out_dir.name}={out_dir}     # served per request by name",
            f"medtune export adapter {out_dir} --fuse --out {out_dir.name}-fused  # or fused into the base",
            "```",
            "",
            "Not for clinical decisions without review by a qualified health professional.",
            "",
        ]
        (tmp / "README.md").write_text(str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))),
                                       encoding="utf-8")  # fmt: skip
    return out_dir


def fuse_adapter(
    source: str | Path, out_dir: str | Path, *, base: str | None = None, stage: str | None = None
) -> Path:
    """The adapter merged into its base (or `base`): a standalone model folder."""
    from medtune.train.merge import merge_adapter

    adapter = find_adapter(source, stage)
    return merge_adapter(adapter, out_dir, base_model=base)
