"""Several LoRA adapters on one base model, chosen per request (PEFT mixed-batch inference).

    adapters = AdapterSet(model)                 # a plain transformers model
    adapters.load("derm", "adapters/derm")       # wraps it in a PeftModel on first load
    out = adapters.model(input_ids, **adapters.forward_kwargs(["derm", None, "radio"]))
    adapters.unload("derm")                      # back to the plain model when none is left

Rows of one batch may use different adapters (or none): PEFT's `adapter_names=` forward argument
routes each row through its own LoRA weights, so requests for different adapters share a batch.
The caller serialises `load`/`unload` with forward passes (the engine holds its model lock).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from medtune.serve.errors import BadRequest, NotFound

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def check_adapter_folder(path: str | Path, where: str = "path") -> Path:
    """The folder holds a PEFT LoRA adapter (adapter_config.json + weights); raise BadRequest if not."""
    folder = Path(path).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise BadRequest(
            f"{where}: {folder} is not a LoRA adapter folder (no adapter_config.json)", param=where
        )
    try:
        peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise BadRequest(f"{where}: {config} is not readable JSON: {exc}", param=where) from None
    if peft_type != "LORA":
        raise BadRequest(f"{where}: {config}: expected peft_type LORA, found {peft_type!r}", param=where)
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise BadRequest(f"{where}: {folder} has no adapter_model.safetensors", param=where)
    return folder


class AdapterSet:
    """The model plus its loaded adapters (name -> folder)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.paths: dict[str, str] = {}

    def load(self, name: str, path: str | Path, reserved: tuple[str, ...] = ()) -> None:
        if not _NAME.match(name) or name == BASE or name in reserved:
            raise BadRequest(
                f"adapter name {name!r}: expected letters, digits, '.', '_', ':' or '-' (not a served model name)",
                param="name",
            )
        if name in self.paths:
            raise BadRequest(f"adapter {name!r} is already loaded (from {self.paths[name]})", param="name")
        folder = check_adapter_folder(path)
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(folder), adapter_name=name, is_trainable=False
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise BadRequest(
                f"path: adapter {folder} does not fit this base model: {exc}", param="path"
            ) from None
        self.model.eval()
        self.paths[name] = str(folder)
        log.info("adapter %s loaded from %s", name, folder)

    def unload(self, name: str) -> None:
        if name not in self.paths:
            raise NotFound(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.paths) or 'none'})")
        if len(self.paths) == 1:
            # PEFT cannot delete its last adapter; strip the LoRA layers and keep the plain base.
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)
        del self.paths[name]
        log.info("adapter %s unloaded", name)

    def forward_kwargs(self, names: list[str | None]) -> dict[str, Any]:
        """Extra forward() arguments routing each batch row to its adapter (None = base model)."""
        if not self.paths:
            return {}
        return {"adapter_names": [n or BASE for n in names]}
