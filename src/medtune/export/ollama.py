"""Ollama export: a Modelfile whose TEMPLATE formats conversations exactly as training did.

    medtune export ollama runs/headache --out ollama/headache      # converts to GGUF first (q4_k_m)
    medtune export ollama model-q8_0.gguf --out ollama/m --system "Tu es ..."
    export = write_ollama("runs/headache", "ollama/headache")
    print(export.create_command)                                   # ollama create headache -f ...

The TEMPLATE is Go text/template built from the chat template's per-message pieces
(`medtune.export.chat`), read from the GGUF file itself, so what Ollama renders is what llama.cpp,
`medtune serve` and training render. Every literal is a Go string literal (`{{ "..." }}`), so
whitespace and newlines survive Go's trimming exactly. Stop strings are the GGUF's end-of-turn and eos
tokens. SYSTEM comes from `--system`, else the run's recipe (model.system_prompt or the task's system
prompt), else the template's own default; temperature and num_ctx from the recipe's export.ollama.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError, ModelError
from medtune.export.chat import ChatLayout, chat_layout, template_renderer
from medtune.io import write_text

log = logging.getLogger(__name__)


@dataclass
class OllamaExport:
    modelfile: Path
    gguf: Path
    name: str
    create_command: str


def _lit(text: str) -> str:
    """A Go template action printing `text` (JSON string escapes are valid Go escapes); '' if empty."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(layout: ChatLayout, *, include_lead: bool) -> str:
    """Ollama TEMPLATE (Go text/template over .Messages) equivalent to `layout` with a generation prompt."""
    p, s = layout.prefix, layout.suffix
    joined = layout.system_joins_user
    lines = []
    if include_lead and layout.lead:
        lines.append(_lit(layout.lead))
    if joined:
        lines.append("{{- $joined := false }}")
    lines.append("{{- range .Messages }}")
    first = "if"
    if layout.supports_system:
        mark = "{{ $joined = true }}" if joined else ""
        lines.append(
            f'{{{{- if eq .Role "system" }}}}{_lit(p["system"])}{{{{ .Content }}}}{_lit(s["system"])}{mark}'
        )
        first = "else if"
    if joined:
        user_open = "{{ if not $joined }}" + _lit(p["user"]) + "{{ end }}" if p["user"] else ""
        user = f"{user_open}{{{{ .Content }}}}{_lit(s['user'])}{{{{ $joined = false }}}}"
    else:
        user = f"{_lit(p['user'])}{{{{ .Content }}}}{_lit(s['user'])}"
    lines.append(f'{{{{- {first} eq .Role "user" }}}}{user}')
    lines.append(
        f'{{{{- else if eq .Role "assistant" }}}}{_lit(p["assistant"])}{{{{ .Content }}}}{_lit(s["assistant"])}'
    )
    lines.append("{{- end }}")
    lines.append("{{- end }}" + _lit(layout.generation_prompt))
    return "\n".join(lines)


def _modelfile_string(text: str, what: str) -> str:
    if '"""' in text:
        raise ConfigError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def render_modelfile(
    gguf_from: str,
    template: str,
    stops: list[str],
    *,
    system: str | None,
    temperature: float | None,
    num_ctx: int | None,
    header: str = "",
) -> str:
    lines = [f"# {line}" for line in header.splitlines()] + [f"FROM {gguf_from}"]
    lines.append(f"TEMPLATE {_modelfile_string(template, 'the chat template')}")
    if system:
        lines.append(f"SYSTEM {_modelfile_string(system, 'the system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature:g}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def gguf_chat_info(path: Path) -> dict[str, Any]:
    """Chat template, BOS/EOS/EOT texts, add_bos and context length read from a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = value(key)
        return tokens.contents(token_id) if token_id is not None else None

    arch = value("general.architecture")
    return {
        "chat_template": value("tokenizer.chat_template"),
        "bos": token("tokenizer.ggml.bos_token_id"),
        "eos": token("tokenizer.ggml.eos_token_id"),
        "eot": token("tokenizer.ggml.eot_token_id"),
        "add_bos": bool(value("tokenizer.ggml.add_bos_token")),
        "context_length": value(f"{arch}.context_length"),
    }


def _recipe_defaults(source: Path) -> dict[str, Any]:
    """System prompt, temperature and num_ctx from a run folder's recipe ({} for anything else)."""
    from medtune.export.runs import read_manifest

    if not (source.is_dir() and (source / "manifest.json").is_file()):
        return {}
    recipe = read_manifest(source).get("recipe") or {}
    system = (recipe.get("model") or {}).get("system_prompt")
    if not system and recipe.get("task"):
        from medtune.tasks import get_task

        system = get_task(recipe["task"]).system_prompt
    ollama = (recipe.get("export") or {}).get("ollama") or {}
    return {"system": system, "temperature": ollama.get("temperature"), "num_ctx": ollama.get("num_ctx")}


def write_ollama(
    source: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    quant: str = "q4_k_m",
    system: str | None = None,
    temperature: float | None = None,
    num_ctx: int | None = None,
    template: str | None = None,
) -> OllamaExport:
    """Write `out_dir/Modelfile` for a GGUF file, or for a run/model folder (converted to GGUF first)."""
    source, out_dir = Path(source), Path(out_dir)
    defaults = _recipe_defaults(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise ModelError(f"{source}: no such GGUF file")
        gguf_path = source
    else:
        from medtune.export.gguf import export_gguf

        stem = name or (source.name if defaults else None)
        out = out_dir / f"{stem}-{quant}.gguf" if stem else None
        gguf_path = export_gguf(source, out or out_dir / f"model-{quant}.gguf", quant).path
    info = gguf_chat_info(gguf_path)
    if template is None:
        if not info["chat_template"]:
            raise ModelError(f"{gguf_path}: no tokenizer.chat_template in the GGUF; pass --template FILE")
        render = template_renderer(info["chat_template"], info["bos"], info["eos"])
        layout = chat_layout(render, info["bos"], info["eos"])
        # llama.cpp (and Ollama) add BOS themselves when add_bos is set; otherwise the text carries it.
        template = go_template(layout, include_lead=not info["add_bos"])
        if layout.trims_content:
            log.warning("the chat template strips spaces around message contents and Ollama's TEMPLATE cannot: "
                        "send contents without leading or trailing whitespace")  # fmt: skip
        if system and not layout.supports_system:
            log.warning("the chat template has no system turn: the SYSTEM prompt will be ignored")
        default_system = layout.default_system
    else:
        default_system = None
    stops = list(dict.fromkeys(t for t in (info["eot"], info["eos"]) if t))
    system = system or defaults.get("system") or default_system
    temperature = temperature if temperature is not None else defaults.get("temperature", 0.0)
    context = info["context_length"]
    wanted = num_ctx or defaults.get("num_ctx") or context
    if context and wanted and wanted > context:
        log.warning("num_ctx %d is above the model's context length %d; using %d", wanted, context, context)
        wanted = context
    name = name or gguf_path.stem.removesuffix(f"-{quant}")
    modelfile = out_dir / "Modelfile"
    command = f"ollama create {name} -f {modelfile}"
    rel = os.path.relpath(gguf_path.resolve(), out_dir.resolve())
    text = render_modelfile(
        f"./{rel}" if not rel.startswith("..") else str(gguf_path.resolve()),
        template,
        stops,
        system=system,
        temperature=temperature,
        num_ctx=wanted,
        header=f"Written by medtune from {source}.\nCreate the model with: {command}",
    )
    write_text(modelfile, text)
    return OllamaExport(modelfile, gguf_path, name, command)
