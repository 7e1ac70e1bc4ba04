"""Headache triage task pack: French clinical cases -> `Pour préciser:` or `Recommandation:` (MISSION.md 4).

    task = get_task("headache")
    task.render_prompt({"case": "patiente 34 ans, céphalées brutales, pas de fièvre"})
    task.label(record)              # "red_flag"
    task.generate_sft(500, seed=1); task.generate_dpo(200, seed=1)
    task.score(test_examples, predictions)

Labels: clarify, red_flag, no_red_flag, ambiguous. The rules (negations, hedges, red flags, key
facts) and the reference answers are documented in `medtune.tasks.headache_rules`; the generator in
`medtune.tasks.headache_generate`. Answers are free text (no JSON schema); production decodes greedily
(temperature 0, as the seed's Ollama Modelfile).
"""

from __future__ import annotations

import random
import re
from typing import Any, ClassVar

from medtune.errors import DataError
from medtune.tasks import headache_generate as gen
from medtune.tasks.base import Task, fold_text
from medtune.tasks.headache_rules import (
    AMBIGUOUS,
    CLARIFY,
    LABELS,
    NO_RED_FLAG,
    PREFIXES,
    RED_FLAG,
    analyse,
    find_status,
    reference,
)

# What each label's reference answer decides; a prediction is read into the same three decisions.
DECISION = {CLARIFY: "clarify", RED_FLAG: "urgent", AMBIGUOUS: "urgent", NO_RED_FLAG: "non_urgent"}
# Words each of the three standard questions must contain (folded), in order.
QUESTION_KEYS = [("depuis quand", "caractere"), ("fievre", "deficit"), ("grossesse", "traumatisme")]


class HeadacheTask(Task):
    name: ClassVar[str] = "headache"
    description: ClassVar[str] = (
        "Triage des céphalées (cas cliniques en français): préciser ou recommander l'imagerie."
    )
    system_prompt: ClassVar[str] = (
        "Tu es un assistant médical spécialisé dans l'aide à la prescription d'imagerie pour les céphalées. "
        'Tu dois TOUJOURS répondre en français et commencer ta réponse par "Pour préciser:" ou "Recommandation:".'
    )
    labels: ClassVar[list[str]] = LABELS
    temperature: ClassVar[float] = 0.0
    max_tokens: ClassVar[int] = 256

    def validate_input(self, record: dict[str, Any]) -> dict[str, Any]:
        """{"case": non-empty text} (alias "cas"), optional "facts" (dict) kept as is."""
        if not isinstance(record, dict):
            raise DataError(
                f"headache input: expected an object with a 'case' text, found {type(record).__name__}"
            )
        text = record.get("case", record.get("cas"))
        if text is None:
            raise DataError(f"headache input: field 'case' is missing (found keys: {sorted(record)})")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"headache input: field 'case' must be a non-empty text, found {text!r}")
        out: dict[str, Any] = {"case": text.strip()}
        if record.get("facts") is not None:
            if not isinstance(record["facts"], dict):
                raise DataError(f"headache input: field 'facts' must be an object, found {record['facts']!r}")
            out["facts"] = record["facts"]
        return out

    def render_prompt(self, record: dict[str, Any]) -> str:
        case = self.validate_input(record)["case"]
        # The seed's instruction format (seed 003), kept so prompts match its deployed assistant.
        return (
            f"CAS CLINIQUE:\n{case}\n\n"
            "RÉPONDS en français, commence par 'Pour préciser:' ou 'Recommandation:'"
        )

    def label(self, record: dict[str, Any]) -> str:
        return analyse(self.validate_input(record)["case"]).label

    def reference_answer(self, record: dict[str, Any]) -> str:
        return reference(analyse(self.validate_input(record)["case"]))

    def generate_inputs(self, n: int, seed: int, hard_share: float | None = None) -> list[dict[str, Any]]:
        return gen.generate_cases(n, seed)  # no hard_share (has_hard_share is False)

    sft_size: ClassVar[int] = 500
    dpo_size: ClassVar[int] = 200
    rejection_kinds: ClassVar[list[str]] = gen.REJECTION_KINDS

    def rejected_answer(self, record: dict[str, Any], kind: str, rng: random.Random) -> str:
        return gen.corrupt_answer(record["case"], kind, rng)

    def score(self, examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
        """Metrics for raw answers against examples carrying `input` (and optionally `label`).

        - format_compliance: starts with `Pour préciser:` or `Recommandation:`, and a `Pour préciser:`
          answer asks exactly three questions (three "?").
        - question_accuracy (clarify cases): `Pour préciser:` with exactly the three standard questions,
          in order (each holds its key words: depuis quand/caractère, fièvre/déficit, grossesse/traumatisme).
        - red_flag_sensitivity (MISSION.md's "red-flag detection"): share of red_flag and
          ambiguous cases (reference = urgent MRI) answered
          with an urgent recommendation (a non-negated "urgence/urgent(e)" after `Recommandation:`).
        - false_positive_rate: share of no_red_flag and clarify cases (no red flag) answered urgent.
        - decision_accuracy: the answer's decision (clarify / urgent / non_urgent / invalid) equals the
          reference's; per_label gives n and decision accuracy per label. Empty answers count as wrong.
        """
        if len(examples) != len(predictions):
            raise DataError(f"headache score: {len(examples)} examples but {len(predictions)} predictions")
        if not examples:
            raise DataError("headache score: no examples to score")
        per = {label: {"n": 0, "correct": 0} for label in LABELS}
        tally = dict.fromkeys(
            ["format", "questions", "clarify", "flagged", "detected", "unflagged", "false_pos"], 0
        )
        for i, (example, prediction) in enumerate(zip(examples, predictions, strict=True)):
            if "input" not in example:
                raise DataError(f"headache score: example {i} has no 'input' case")
            label = example.get("label") or self.label(example["input"])
            if label not in per:
                raise DataError(f"headache score: example {i}: label {label!r} is not one of {LABELS}")
            text = prediction.strip() if isinstance(prediction, str) else ""
            decided = decision(text)
            tally["format"] += format_ok(text)
            per[label]["n"] += 1
            per[label]["correct"] += decided == DECISION[label]
            if label == CLARIFY:
                tally["clarify"] += 1
                tally["questions"] += questions_ok(text)
            if DECISION[label] == "urgent":
                tally["flagged"] += 1
                tally["detected"] += decided == "urgent"
            else:
                tally["unflagged"] += 1
                tally["false_pos"] += decided == "urgent"
        n = len(examples)

        def rate(num: int, den: int) -> float | None:
            return num / den if den else None

        return {
            "n": n,
            "format_compliance": tally["format"] / n,
            "question_accuracy": rate(tally["questions"], tally["clarify"]),
            "red_flag_sensitivity": rate(tally["detected"], tally["flagged"]),
            "false_positive_rate": rate(tally["false_pos"], tally["unflagged"]),
            "decision_accuracy": sum(v["correct"] for v in per.values()) / n,
            "per_label": {
                k: {"n": v["n"], "decision_accuracy": rate(v["correct"], v["n"])} for k, v in per.items()
            },
            "counts": tally,
        }


def decision(text: str) -> str:
    """clarify / urgent / non_urgent for a well-prefixed answer, else invalid."""
    if text.startswith(PREFIXES[0]):
        return "clarify"
    if text.startswith(PREFIXES[1]):
        return "urgent" if find_status(text, (r"urgen\w*",)) in ("present", "possible") else "non_urgent"
    return "invalid"


def format_ok(text: str) -> bool:
    if text.startswith(PREFIXES[1]):
        return True
    return text.startswith(PREFIXES[0]) and text.count("?") == 3


def questions_ok(text: str) -> bool:
    if not format_ok(text) or not text.startswith(PREFIXES[0]):
        return False
    questions = [fold_text(q) for q in re.split(r"\?", text[len(PREFIXES[0]) :])[:3]]
    return all(all(k in q for k in keys) for q, keys in zip(questions, QUESTION_KEYS, strict=True))
