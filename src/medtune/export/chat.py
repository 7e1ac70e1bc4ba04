"""What a tokenizer's chat template does, learnt by rendering it: the literal text around each message.
Used to write an Ollama TEMPLATE equivalent to the Jinja template training used.

    layout = chat_layout(tokenizer_renderer(tokenizer), tokenizer.bos_token)
    layout.prefix["user"]             # "<|im_start|>user\\n" for chatml
    layout.render(messages, True) == render_chat(messages, tokenizer, True)

`template_renderer` does the same from a bare Jinja string (a GGUF file's `tokenizer.chat_template`).

A Jinja template cannot be translated to Go's text/template in general, but most chat templates are
"per message": every message is `prefix[role] + content + suffix[role]`, optionally led once by a BOS
text and by a default system turn when the conversation has none (alpaca, vicuna, Qwen 2.5), with the
system text opening the first user turn in Mistral and Gemma, and followed by a generation prompt (or,
without one, a trailer such as Phi-3's eos). We render conversations whose contents are sentinel
strings, cut the output at the sentinels, and check that the pieces rebuild other conversations
exactly. A template outside this family fails that check with a ModelError instead of yielding a
subtly different format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medtune.errors import DataError, MedtuneError, ModelError

# (messages, add_generation_prompt) -> text
Renderer = Callable[[list[dict[str, str]], bool], str]

_S, _U1, _U2, _A1, _A2 = "⟦S1⟧", "⟦U1⟧", "⟦U2⟧", "⟦A1⟧", "⟦A2⟧"


@dataclass
class ChatLayout:
    """A per-message chat template as literal pieces (see the module docstring)."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    lead: str = ""  # emitted once at the start (a BOS token's text); llama.cpp adds BOS by itself
    default_system: str | None = None  # system text the template uses when the conversation has none
    supports_system: bool = True
    trailer: str = ""  # closes a conversation rendered without a generation prompt (Phi-3: eos)
    # Mistral, Gemma: the system text opens the next user turn, which then has no prefix of its own.
    system_joins_user: bool = False
    trims_content: bool = False  # Llama 3, Gemma strip whitespace around each message's content

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        parts = [self.lead]
        previous = None
        for m in messages:
            joined = self.system_joins_user and previous == "system" and m["role"] == "user"
            content = m["content"].strip() if self.trims_content else m["content"]
            parts += ["" if joined else self.prefix[m["role"]], content, self.suffix[m["role"]]]
            previous = m["role"]
        return "".join(parts) + (self.generation_prompt if add_generation_prompt else self.trailer)


def tokenizer_renderer(tokenizer: Any) -> Renderer:
    """Render with a Hugging Face tokenizer's template through `render_chat`, as training did."""
    from medtune.data.templates import render_chat

    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template (set model.chat_template in the recipe)")
    return lambda messages, gen: render_chat(messages, tokenizer, add_generation_prompt=gen)


def template_renderer(template: str, bos_token: str | None, eos_token: str | None) -> Renderer:
    """Render a bare Jinja chat template the way transformers does (same sandbox and extensions)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        try:
            rendered, _ = render_jinja_template(
                [messages], chat_template=template, add_generation_prompt=gen, bos_token=bos_token or "",
                eos_token=eos_token or "",
            )  # fmt: skip
        except TemplateError as exc:
            raise DataError(f"the chat template rejected the conversation: {exc}") from None
        return rendered[0]

    return render


def _render(render: Renderer, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
    return render([{"role": r, "content": c} for r, c in turns], generation_prompt)


def _split(text: str, sentinels: list[str]) -> list[str]:
    """Cut `text` at each sentinel in order: n sentinels give n+1 pieces."""
    pieces = []
    for s in sentinels:
        head, found, text = text.partition(s)
        if not found:
            raise ModelError(f"chat template: a message content ({s}) does not appear verbatim in the output")
        pieces.append(head)
    return [*pieces, text]


def _not_per_message(what: str) -> ModelError:
    return ModelError(
        f"the chat template is not per-message ({what}), so no Ollama TEMPLATE can be derived from it "
        "automatically; write one and pass it with --template FILE"
    )


def _without_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise _not_per_message(what)
    return text[len(prefix) :]


def _without_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise _not_per_message(what)
    return text[: len(text) - len(suffix)]


def chat_layout(render: Renderer, bos_token: str | None = None, eos_token: str | None = None) -> ChatLayout:
    """The per-message pieces of a chat template, checked on several conversations."""
    user_only = _render(render, [("user", _U1)], False)
    with_gen = _render(render, [("user", _U1)], True)
    # Some templates close a conversation that has no generation prompt with a trailer (Phi-3: eos).
    trailer = next(
        (
            t
            for t in ("", eos_token or "")
            if user_only.endswith(t) and with_gen.startswith(user_only[: len(user_only) - len(t)])
        ),
        None,
    )
    if trailer is None:
        raise _not_per_message("generation prompt")

    def untrailed(turns: list[tuple[str, str]]) -> str:
        return _without_suffix(_render(render, turns, False), trailer, "end of conversation")

    head, user_suffix = _split(untrailed([("user", _U1)]), [_U1])
    generation_prompt = with_gen[len(user_only) - len(trailer) :]
    _, between, assistant_suffix = _split(untrailed([("user", _U1), ("assistant", _A1)]), [_U1, _A1])
    assistant_prefix = _without_prefix(between, user_suffix, "assistant turn")
    uau = untrailed([("user", _U1), ("assistant", _A1), ("user", _U2)])
    user_prefix = _without_prefix(_split(uau, [_U1, _A1, _U2])[2], assistant_suffix, "second user turn")
    lead = bos_token if bos_token and head.startswith(bos_token) else ""
    # What the template puts before the first user turn: nothing, or a default system turn.
    preamble = _without_suffix(head[len(lead) :], user_prefix, "first user turn")

    prefix = {"user": user_prefix, "assistant": assistant_prefix, "system": ""}
    suffix = {"user": user_suffix, "assistant": assistant_suffix, "system": ""}
    default_system = None
    system_joins_user = False
    try:
        su = untrailed([("system", _S), ("user", _U1)])
    except MedtuneError:  # the template raises on a system turn (e.g. Gemma 2)
        supports_system = False
        if preamble:
            raise _not_per_message("text before the first user turn") from None
    else:
        supports_system = True
        before, after, _ = _split(su, [_S, _U1])
        prefix["system"] = _without_prefix(before, lead, "system turn")
        if after.endswith(user_prefix):
            suffix["system"] = after[: len(after) - len(user_prefix)]
        elif prefix["system"] == user_prefix and not preamble:
            system_joins_user, suffix["system"] = True, after
        else:
            raise _not_per_message("system turn")
        if preamble:
            inner = _without_prefix(preamble, prefix["system"], "default system turn")
            default_system = _without_suffix(inner, suffix["system"], "default system turn")
    trims = _U1 in (padded := _render(render, [("user", f" {_U1} ")], False)) and f" {_U1} " not in padded
    layout = ChatLayout(
        prefix,
        suffix,
        generation_prompt,
        lead,
        default_system,
        supports_system,
        trailer,
        system_joins_user,
        trims,
    )

    checks: list[tuple[list[tuple[str, str]], bool]] = [
        ([("user", _U1), ("assistant", _A1), ("user", _U2)], True),
        ([("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)], False),
    ]
    if supports_system:
        checks.append(([("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)], True))
    for turns, gen in checks:
        expected = _render(render, turns, gen)
        got = layout.render([{"role": r, "content": c} for r, c in turns], gen)
        if got != expected:
            raise _not_per_message(
                f"a ({', '.join(r for r, _ in turns)}) conversation renders as {expected!r}, "
                f"not as the sum of its turns {got!r}"
            )
    return layout
