"""Ollama Modelfiles: the Go TEMPLATE renders conversations exactly as the tokenizer's chat template.

Ollama is not installable here, so the test carries a small renderer for the subset of Go's
text/template the generated templates use (range, if / else if / else, eq, not, variables, string
literals, `.Role` / `.Content`, `{{-` / `-}}` trimming) and applies Ollama's SYSTEM rule (the Modelfile's
system prompt is added as the first message when a request has none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from medtune.data.templates import TEMPLATES, ensure_chat_template, render_chat
from medtune.errors import ModelError
from medtune.export.chat import chat_layout, tokenizer_renderer
from medtune.export.ollama import go_template, write_ollama

# -------------------------------------------------------------------------------------------------
# A Go text/template subset


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in re.finditer(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", template, re.S):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        tail = tail.lstrip()
    out.append(("text", tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
        elif value in stop or value.split(" ")[0] in stop or value.startswith("else"):
            return nodes, i
        elif value.startswith("range "):
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", value[6:].strip(), body))
            i += 1
        elif value.startswith("if "):
            branches = []
            cond = value[3:]
            while True:
                body, i = _parse(tokens, i + 1, ("end",))
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                cond = action[8:] if action.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("expr", value))
            i += 1
    return nodes, i


def _value(expr: str, dot: dict[str, Any], env: dict[str, Any]) -> Any:
    expr = expr.strip()
    if expr.startswith('"'):
        return json.loads(expr)  # the generated literals use JSON-compatible Go escapes
    if expr in ("true", "false"):
        return expr == "true"
    if expr.startswith("$"):
        return env[expr]
    if expr.startswith("."):
        return dot[expr[1:]]
    op, _, rest = expr.partition(" ")
    args = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', rest)
    if op == "eq":
        return _value(args[0], dot, env) == _value(args[1], dot, env)
    if op == "not":
        return not _value(args[0], dot, env)
    raise AssertionError(f"unsupported Go template expression: {expr}")


def _exec(nodes: list[Any], dot: dict[str, Any], env: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "range":
            for item in dot[node[1].lstrip(".")]:
                _exec(node[2], item, env, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if _value(cond, dot, env):
                    _exec(body, dot, env, out)
                    break
        elif m := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", node[1]):
            env[m.group(1)] = _value(m.group(2), dot, env)
        else:
            out.append(str(_value(node[1], dot, env)))


def render_go(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    nodes, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    _exec(nodes, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}, {}, out)
    return "".join(out)


# -------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Mesures : valgus_genou = 12.5°. Diagnostic ?"}],
    [
        {"role": "system", "content": "Tu es un assistant médical.\nRéponds en JSON."},
        {"role": "user", "content": "Patiente de 34 ans, céphalées."},
        {"role": "assistant", "content": 'Pour préciser: {"début": "brutal"}'},
        {"role": "user", "content": "  pas de fièvre  "},
    ],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_like_the_chat_template(tiny_model_dir: Path, name: str):
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ensure_chat_template(tok, name, override=True)
    layout = chat_layout(tokenizer_renderer(tok), tok.bos_token, tok.eos_token)
    # The embedded tokenizer does not add BOS, so a template's own BOS text must stay in TEMPLATE.
    template = go_template(layout, include_lead=True)
    for messages in CONVERSATIONS:
        if layout.trims_content:  # Go templates cannot strip; Ollama users send trimmed contents
            messages = [{**m, "content": m["content"].strip()} for m in messages]
        expected = render_chat(messages, tok, add_generation_prompt=True)
        assert render_go(template, messages, layout.default_system) == expected


def test_templates_that_strip_contents_are_detected(tiny_model_dir: Path):
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ensure_chat_template(tok, "llama3", override=True)
    assert chat_layout(tokenizer_renderer(tok), tok.bos_token, tok.eos_token).trims_content
    ensure_chat_template(tok, "chatml", override=True)
    assert not chat_layout(tokenizer_renderer(tok), tok.bos_token, tok.eos_token).trims_content


def test_a_template_outside_the_per_message_family_is_refused(tiny_model_dir: Path):
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    # The last user turn is rendered differently from the others: no per-message pieces exist.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ModelError, match="not per-message"):
        chat_layout(tokenizer_renderer(tok), tok.bos_token, tok.eos_token)


def _modelfile(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    fields: dict[str, Any] = {"PARAMETER": {}}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (?:"""(.*?)"""|([^\n]*))$', text, re.S | re.M):
        key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if key == "PARAMETER":
            name, _, raw = value.partition(" ")
            fields["PARAMETER"].setdefault(name, []).append(json.loads(raw))
        else:
            fields[key] = value
    return fields


def test_modelfile_for_a_gguf_carries_template_stops_and_system(ggufs, tiny_model_dir, tmp_path):
    from medtune.train.models import load_tokenizer

    system = "Tu es un assistant de triage des céphalées. Réponds par Pour préciser: ou Recommandation:"
    export = write_ollama(ggufs["q8_0"], tmp_path / "ollama", system=system, name="headache")
    assert export.create_command == f"ollama create headache -f {tmp_path / 'ollama' / 'Modelfile'}"
    fields = _modelfile(export.modelfile)
    assert (export.modelfile.parent / fields["FROM"]).resolve() == ggufs["q8_0"].resolve()
    assert fields["SYSTEM"] == system
    assert fields["PARAMETER"]["stop"] == ["<|im_end|>"]
    assert fields["PARAMETER"]["temperature"] == [0]
    assert fields["PARAMETER"]["num_ctx"] == [1024]  # the model's context, not Ollama's larger default
    tok = load_tokenizer(tiny_model_dir)
    for messages in CONVERSATIONS:
        assert render_go(fields["TEMPLATE"], messages, fields["SYSTEM"]) == render_chat(
            [{"role": "system", "content": system}, *messages]
            if messages[0]["role"] != "system"
            else messages,
            tok,
            add_generation_prompt=True,
        )


def test_modelfile_for_a_model_folder_converts_it_first(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    export = write_ollama(tiny_model_dir, tmp_path / "out", name="tiny", quant="q8_0", temperature=0.3)
    assert export.gguf == tmp_path / "out" / "tiny-q8_0.gguf" and export.gguf.is_file()
    fields = _modelfile(export.modelfile)
    assert fields["FROM"] == "./tiny-q8_0.gguf"
    assert fields["PARAMETER"]["temperature"] == [0.3]
    assert "SYSTEM" not in fields
