"""Fixtures for the data tests: a word-level tokenizer built in-process (nothing downloaded)."""

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medtune.data.templates import TEMPLATE_TOKENS, ensure_chat_template

WORDS = [
    "Tu",
    "es",
    "un",
    "assistant",
    "de",
    "triage",
    "Céphalée",
    "brutale",
    "depuis",
    "une",
    "heure",
    "Recommandation",
    "IRM",
    "cérébrale",
    "urgente",
    "Et",
    "sans",
    "fièvre",
    "?",
    "début",
    "en",
    "coup",
    "tonnerre",
    "Q",
    "A",
]


def make_tokenizer(template_name: str | None = None) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; with a template name, its special tokens and that template."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(sorted(set(WORDS)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if template_name:
        tok.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS[template_name]})
        ensure_chat_template(tok, template_name)
    return tok


@pytest.fixture
def chat_tokenizer() -> Callable[[str | None], PreTrainedTokenizerFast]:
    return make_tokenizer
