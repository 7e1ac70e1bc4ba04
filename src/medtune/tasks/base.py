"""The interface every clinical task pack implements (one module per task in `medtune.tasks`).

A task turns an input record into chat messages, knows the right answer (a rule-based labeller),
generates seeded synthetic SFT pairs and DPO triplets, and scores predictions. Canonical record
shapes (shared with `medtune.data`):

- SFT example:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
                       "label": str (optional), "input": dict (optional, the task record)}
- Preference example: {"prompt": [messages...], "chosen": [assistant message],
                       "rejected": [assistant message], "label": str (optional)}
- Test example:       {"input": dict, "label": str, "reference": str, "messages": [system, user]}
"""

from __future__ import annotations

import random
import unicodedata
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from medtune.errors import ConfigError


class Task(ABC):
    """A clinical task pack. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    system_prompt: ClassVar[str]
    labels: ClassVar[list[str]]  # the label set used for stratification and per-class metrics
    # Production request settings (MISSION.md): temperature, max_tokens for the main call.
    temperature: ClassVar[float] = 0.0
    max_tokens: ClassVar[int] = 256

    @abstractmethod
    def validate_input(self, record: dict[str, Any]) -> dict[str, Any]:
        """Check and normalise an input record; raise DataError naming the bad field."""

    @abstractmethod
    def render_prompt(self, record: dict[str, Any]) -> str:
        """The user message for an input record."""

    def output_schema(self) -> dict[str, Any] | None:
        """JSON schema of the answer when it is structured, else None."""
        return None

    def response_format(self) -> dict[str, Any] | None:
        """The OpenAI `response_format` production sends, or None for free text."""
        schema = self.output_schema()
        if schema is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": schema, "strict": True}}

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """System + user messages for a record (the request production sends)."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.render_prompt(record)},
        ]

    @abstractmethod
    def label(self, record: dict[str, Any]) -> str:
        """The reference label (the rules)."""

    @abstractmethod
    def reference_answer(self, record: dict[str, Any]) -> str:
        """The reference assistant answer text (JSON text for structured tasks)."""

    @abstractmethod
    def generate_inputs(self, n: int, seed: int, hard_share: float | None = None) -> list[dict[str, Any]]:
        """n seeded synthetic input records, balanced over labels. `hard_share` (tasks with
        `has_hard_share`) sets how often the cases the task finds hardest are drawn; None: the default."""

    has_hard_share: ClassVar[bool] = False

    sft_size: ClassVar[int] = 1500  # examples generate_sft / generate_dpo make when n is not given
    dpo_size: ClassVar[int] = 420

    def _check_hard_share(self, hard_share: float | None) -> None:
        if hard_share is not None and not self.has_hard_share:
            raise ConfigError(f"data.generate.hard_share: the {self.name} task has no such setting")

    def generate_sft(
        self, n: int | None = None, seed: int = 0, hard_share: float | None = None
    ) -> list[dict[str, Any]]:
        """n (default `sft_size`) SFT examples (canonical messages form, with `label` and `input`)."""
        self._check_hard_share(hard_share)
        return [
            {
                "messages": [*self.messages(r), {"role": "assistant", "content": self.reference_answer(r)}],
                "label": self.label(r),
                "input": r,
            }
            for r in self.generate_inputs(self.sft_size if n is None else n, seed, hard_share)
        ]

    rejection_kinds: ClassVar[list[str]] = []  # the ways `rejected_answer` can be wrong

    def rejected_answer(self, record: dict[str, Any], kind: str, rng: random.Random) -> str:
        """A worse answer than the reference for `record`, wrong in the way `kind` names."""
        raise NotImplementedError(f"the {self.name} task has no preference data")

    def generate_dpo(
        self, n: int | None = None, seed: int = 0, hard_share: float | None = None
    ) -> list[dict[str, Any]]:
        """n (default `dpo_size`) preference triplets (prompt / chosen / rejected) whose rejected answers cycle through
        `rejection_kinds` in equal shares; the cases are not the SFT cases of the same seed."""
        self._check_hard_share(hard_share)
        rng = random.Random(f"{self.name}-dpo-{seed}")
        out = []
        for i, r in enumerate(
            self.generate_inputs(self.dpo_size if n is None else n, seed + 7919, hard_share)
        ):
            kind = self.rejection_kinds[i % len(self.rejection_kinds)]
            out.append(
                {
                    "prompt": self.messages(r),
                    "chosen": [{"role": "assistant", "content": self.reference_answer(r)}],
                    "rejected": [{"role": "assistant", "content": self.rejected_answer(r, kind, rng)}],
                    "label": self.label(r),
                    "rejected_kind": kind,
                }
            )
        return out

    def generate_test(self, n: int, seed: int) -> list[dict[str, Any]]:
        """n held-out test cases: input, label, reference answer and the request messages."""
        return [
            {
                "input": r,
                "label": self.label(r),
                "reference": self.reference_answer(r),
                "messages": self.messages(r),
            }
            for r in self.generate_inputs(n, seed)
        ]

    @abstractmethod
    def score(self, examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
        """Metrics for predictions (raw model output text) against test examples."""


# Small helpers shared by the task packs.


def fold_text(text: str) -> str:
    """Lower-case, strip accents, unify apostrophes/hyphens and collapse whitespace.

    Used for tolerant matching (negation cues, normalised label comparison), never for exact scores.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2011", "-").replace("\u2010", "-")
    return " ".join(text.casefold().split())


def label_quotas(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split n examples over labels in proportion to `weights` (largest remainder, sums exactly to n)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    quotas = {k: int(v) for k, v in raw.items()}
    # Remainders go to the largest fractional parts; ties broken by the order of `weights`.
    order = sorted(weights, key=lambda k: -(raw[k] - quotas[k]))
    for k in order[: n - sum(quotas.values())]:
        quotas[k] += 1
    return quotas
