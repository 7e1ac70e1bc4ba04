"""Chat formatting: the one function that turns a conversation into model text, for training and serving.

    ensure_chat_template(tokenizer, "chatml")     # keeps the tokenizer's own template when it has one
    text = render_chat(messages, tokenizer)                                # training: whole conversation
    prompt = render_chat(messages[:-1], tokenizer, add_generation_prompt=True)   # serving: the prompt
    stops = end_of_turn_tokens(tokenizer)         # e.g. ["<|im_end|>", "</s>"] for Ollama / llama.cpp

Because training and serving both call `render_chat` (which calls the tokenizer's own
`apply_chat_template`), the prompt a served model sees is exactly the text it was trained on.

Every named template wraps each assistant turn in `{% generation %}...{% endgeneration %}`, with the
end-of-turn token inside the block, so TRL's `assistant_only_loss=True` trains on the answers and on
the token that stops them. The llama3, gemma, phi3 and qwen templates are TRL's own training variants of
the models' templates (read from the installed `trl` package); TRL ships none for chatml, mistral,
alpaca, vicuna and zephyr, so those are written here, following the models' published formats (alpaca
and vicuna as in MyMedicalGPT / FastChat).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

# Transformers renders with trim_blocks/lstrip_blocks, so every newline below is an explicit '\n'.
CHATML = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
        {{- message['content'] + '<|im_end|>\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Mistral Instruct has no system role: the system prompt opens the first user turn.
MISTRAL = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- generation %}
        {{- message['content'] + eos_token }}
        {%- endgeneration %}
    {%- endif %}
{%- endfor %}"""

ALPACA = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- system + '\n\n' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}
    {%- elif message['role'] == 'assistant' %}
        {%- generation %}
        {{- message['content'] + eos_token }}
        {%- endgeneration %}
        {{- '\n\n' }}
    {%- endif %}
{%- endfor %}"""

VICUNA = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions." %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- system + ' ' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- 'USER: ' + message['content'] + ' ASSISTANT:' }}
    {%- elif message['role'] == 'assistant' %}
        {%- generation %}
        {{- ' ' + message['content'] + eos_token }}
        {%- endgeneration %}
    {%- endif %}
{%- endfor %}"""

# Zephyr (also TinyLlama-1.1B-Chat).
ZEPHYR = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}
        {{- message['content'] + eos_token + '\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}"""

# Name -> file among TRL's training templates (trl/chat_templates/).
_TRL_FILES = {
    "llama3": "llama3_training.jinja",
    "gemma": "gemma3_training.jinja",  # Gemma 3 / MedGemma: the system prompt opens the first user turn
    "phi3": "phi3_training.jinja",
    "qwen": "qwen2_5_training.jinja",
}
ALIASES = {
    "qwen2": "qwen",
    "qwen2.5": "qwen",
    "llama-3": "llama3",
    "llama3.1": "llama3",
    "gemma3": "gemma",
    "medgemma": "gemma",
    "phi-3": "phi3",
    "biomistral": "mistral",
    "tinyllama": "zephyr",
}
# Special strings each template uses: a model builder may add them to the vocabulary.
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "qwen": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "zephyr": ["<|system|>", "<|user|>", "<|assistant|>"],
    "mistral": [],
    "alpaca": [],
    "vicuna": [],
}


def _trl_templates() -> dict[str, str]:
    spec = importlib.util.find_spec("trl")  # locate without importing (keeps `medtune data` light)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the 'trl' package is not installed; it provides the llama3/gemma/phi3/qwen templates"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return {name: (folder / file).read_text(encoding="utf-8") for name, file in _TRL_FILES.items()}


TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    **_trl_templates(),
    "mistral": MISTRAL,
    "alpaca": ALPACA,
    "vicuna": VICUNA,
    "zephyr": ZEPHYR,
}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def _canonical_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TEMPLATES:
        close = difflib.get_close_matches(key, [*TEMPLATES, *ALIASES], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown chat template {name!r} (known: {', '.join(template_names())}){hint}")
    return key


def get_template(name: str) -> str:
    """The Jinja source of a named template (aliases such as 'qwen2.5', 'medgemma', 'tinyllama' work)."""
    return TEMPLATES[_canonical_name(name)]


def ensure_chat_template(tokenizer: Any, name: str | None = None, *, override: bool = False) -> str:
    """Give `tokenizer` a chat template and return where it came from ("tokenizer" or the name).

    The tokenizer's own template wins (it is what the model was trained with) unless `override`;
    otherwise the named one is set. ModelError when the tokenizer has none and no name is given."""
    own = getattr(tokenizer, "chat_template", None)
    if own and not override:
        if name:
            log.info("the tokenizer has its own chat template; the named template %r is not used", name)
        return "tokenizer"
    if not name:
        raise ModelError(
            "the tokenizer has no chat template: name one (recipe key model.chat_template), "
            f"one of {', '.join(template_names())}"
        )
    key = _canonical_name(name)
    tokenizer.chat_template = TEMPLATES[key]
    return key


def render_chat(messages: list[dict[str, Any]], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """Render a conversation with the tokenizer's chat template. Training renders the whole
    conversation; serving renders the prompt turns with `add_generation_prompt=True`."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template; call ensure_chat_template(tokenizer, name) first"
        )
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        roles = [m.get("role") for m in messages]
        raise DataError(f"the chat template rejected a conversation with roles {roles}: {exc}") from None


_SENTINEL = "\u2063medtune-answer\u2063"


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """The strings that end an assistant turn under the tokenizer's template (stop strings for
    serving, Ollama and llama.cpp), read off a rendered probe; the EOS token is always included."""
    user, answer = {"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}
    after = render_chat([user, answer], tokenizer).split(_SENTINEL, 1)[1]
    stops = _leading_tokens(after, tokenizer)
    if not stops:
        # Some templates close an assistant turn only when another message follows: look there.
        after = render_chat([user, answer, user], tokenizer).split(_SENTINEL, 1)[1]
        stops = _leading_tokens(after, tokenizer)[:1]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return list(dict.fromkeys(stops))


def _leading_tokens(after: str, tokenizer: Any) -> list[str]:
    """The special tokens that open `after` (whitespace skipped); if the first is not a token of
    this tokenizer (a named template on a foreign vocabulary), its text up to whitespace."""
    known = sorted(
        {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()} - {None, ""}, key=len, reverse=True
    )
    found: list[str] = []
    pos = 0
    while pos < len(after):
        if after[pos].isspace():
            pos += 1
            continue
        match = next((t for t in known if after.startswith(t, pos)), None)
        if match is None:
            if not found:
                found.append(after[pos:].split()[0])
            break
        found.append(match)
        pos += len(match)
    return found
