"""ARIA task pack: running-biomechanics diagnosis as JSON (MISSION.md section 1).

    task = get_task("aria")
    task.render_prompt({"inclinaison_tronc": 8.4, "valgus_genou": 6.1, ...})
    task.reference_answer(record)   # '{"pathologie": "Lombalgie mécanique", "confiance": ...}'
    task.generate_sft(1500, seed=1); task.generate_dpo(420, seed=1); task.generate_reports(50, seed=1)
    task.score(test_examples, predictions)

Labels: the six pathologies of MISSION.md plus "Aucune pathologie" (NO_PATHOLOGY) when no signal
fires. The rules (strict thresholds, primary = largest relative exceedance, confidence cut-offs) are
documented in `medtune.tasks.aria_rules`; the data generator in `medtune.tasks.aria_generate`.
Two production calls: the diagnosis (JSON schema, temperature 0.1, max_tokens 256) and a free-text
report (`report_messages`, temperature 0.3, max_tokens 2048).
"""

from __future__ import annotations

import json
import random
from typing import Any, ClassVar

import jsonschema

from medtune.errors import DataError
from medtune.tasks import aria_generate as gen
from medtune.tasks.aria_rules import (
    CONFIDENCES,
    FIELDS,
    LABELS,
    NO_PATHOLOGY,
    diagnose,
    fmt,
    fmt_threshold,
    relative_gap,
    validate_input,
)
from medtune.tasks.base import Task, fold_text

INVALID = "invalid"  # confusion-matrix column for answers without a known pathology


class AriaTask(Task):
    name: ClassVar[str] = "aria"
    description: ClassVar[str] = "Diagnostic biomécanique de la course (ARIA): 7 mesures -> JSON."
    system_prompt: ClassVar[str] = (
        "Tu es ARIA, assistant de diagnostic biomécanique de la course à pied. "
        "Réponds uniquement en JSON: pathologie, confiance (élevée, modérée ou faible), justification."
    )
    labels: ClassVar[list[str]] = LABELS
    no_pathology: ClassVar[str] = NO_PATHOLOGY
    temperature: ClassVar[float] = 0.1
    max_tokens: ClassVar[int] = 256
    report_system_prompt: ClassVar[str] = (
        "Tu es ARIA. Rédige en français un rapport biomécanique court et structuré pour le coureur."
    )
    report_temperature: ClassVar[float] = 0.3
    report_max_tokens: ClassVar[int] = 2048

    # --- inputs and prompts -------------------------------------------------------------------

    def validate_input(self, record: dict[str, Any]) -> dict[str, Any]:
        return validate_input(record)

    def render_prompt(self, record: dict[str, Any]) -> str:
        r = validate_input(record)
        # Each measurement with its reference threshold and signed relative gap, as a lab report shows
        # reference ranges: the model still has to pick the pathology (largest positive gap, Achille's
        # double condition, none above), but it need not learn division on digit strings.
        lines = ["Mesures de course (valeur, seuil, écart au seuil):"] + [
            f"{f}: {fmt(f, r[f])} (seuil {fmt_threshold(f)}, {relative_gap(f, r[f])})" for f in FIELDS
        ]
        context = []
        if "age" in r:
            context.append(f"{r['age']:g} ans")
        if "sexe" in r:
            context.append({"F": "femme", "H": "homme"}[r["sexe"]])
        if "km_semaine" in r:
            context.append(f"{r['km_semaine']:g} km/semaine")
        if context:
            lines.append("Coureur: " + ", ".join(context))
        return "\n".join(lines)

    def output_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "pathologie": {"type": "string", "enum": list(LABELS)},
                "confiance": {"type": "string", "enum": list(CONFIDENCES)},
                "justification": {"type": "string"},
            },
            "required": ["pathologie", "confiance", "justification"],
            "additionalProperties": False,
        }

    def response_format(self) -> dict[str, Any]:
        # Production names the schema "diagnostic" (seed 000).
        return {
            "type": "json_schema",
            "json_schema": {"name": "diagnostic", "schema": self.output_schema(), "strict": True},
        }

    def label(self, record: dict[str, Any]) -> str:
        return diagnose(validate_input(record)).pathologie

    def reference_answer(self, record: dict[str, Any]) -> str:
        return gen.answer_json(diagnose(validate_input(record)).answer())

    def report_messages(
        self, record: dict[str, Any], diagnosis: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        """The second ARIA call: measurements and a diagnosis in, a free-text report out.

        `diagnosis` is the first call's parsed answer; by default the rules' answer.
        """
        d = diagnosis or diagnose(validate_input(record)).answer()
        user = (
            self.render_prompt(record)
            + f"\nDiagnostic: {d.get('pathologie', '?')} (confiance {d.get('confiance', '?')})."
            + "\nRédige le rapport."
        )
        return [{"role": "system", "content": self.report_system_prompt}, {"role": "user", "content": user}]

    # --- synthetic data -----------------------------------------------------------------------

    def generate_inputs(self, n: int, seed: int, hard_share: float | None = None) -> list[dict[str, Any]]:
        return gen.generate_inputs(n, seed, hard_share)

    has_hard_share: ClassVar[bool] = True  # the share of cases with a weaker second signal (P_MULTI)
    rejection_kinds: ClassVar[list[str]] = gen.REJECTION_KINDS

    def rejected_answer(self, record: dict[str, Any], kind: str, rng: random.Random) -> str:
        return gen.corrupt_answer(record, kind, rng)

    def generate_reports(self, n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
        """Examples for the free-text report call: messages ending with the reference report."""
        return [
            {
                "messages": [*self.report_messages(r), {"role": "assistant", "content": gen.report_text(r)}],
                "label": self.label(r),
                "input": r,
            }
            for r in self.generate_inputs(n, seed)
        ]

    # --- scoring ------------------------------------------------------------------------------

    def score(self, examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
        """Metrics for raw model answers against examples carrying `input` (and optionally `label`).

        - json_valid: the answer parses as a JSON object; schema_valid: it also validates against
          output_schema(). Malformed JSON and empty answers fail both and count as wrong everywhere.
        - pathology_exact_match: `pathologie` equals the reference label exactly (case and accents
          count); pathology_match_normalized ignores case, accents and whitespace.
        - confidence_agreement: `confiance` equals the rules' confidence (exact string).
        - justification_agreement: `justification` equals the rules' (the measurements that decide, with
          their values and thresholds, as the reference answers write them: "valgus_genou 14.3° > 10°");
          justification_cites_signal: it names the same measurements as the rules' (values aside).
        - per_pathology[label] = {n, exact_match}; confusion[reference][predicted], the predicted
          column being a label or "invalid" (unparseable answer, missing or unknown pathologie).
        """
        if len(examples) != len(predictions):
            raise DataError(f"aria score: {len(examples)} examples but {len(predictions)} predictions")
        if not examples:
            raise DataError("aria score: no examples to score")
        validator = jsonschema.Draft202012Validator(self.output_schema())
        folded = {fold_text(label): label for label in LABELS}
        columns = [*LABELS, INVALID]
        confusion = {ref: dict.fromkeys(columns, 0) for ref in LABELS}
        counts = dict.fromkeys(
            ["json_valid", "schema_valid", "exact", "normalized", "confidence", "why", "cites"], 0
        )
        per = {label: {"n": 0, "correct": 0} for label in LABELS}
        for i, (example, prediction) in enumerate(zip(examples, predictions, strict=True)):
            if "input" not in example:
                raise DataError(f"aria score: example {i} has no 'input' measurements")
            truth = diagnose(validate_input(example["input"], where=f"example {i}: "))
            ref = example.get("label", truth.pathologie)
            if ref not in per:
                raise DataError(f"aria score: example {i}: label {ref!r} is not one of {LABELS}")
            answer = _parse(prediction)
            predicted = INVALID
            if answer is not None:
                counts["json_valid"] += 1
                counts["schema_valid"] += validator.is_valid(answer)
                value = answer.get("pathologie")
                if isinstance(value, str):
                    predicted = value if value in LABELS else INVALID
                    counts["normalized"] += folded.get(fold_text(value)) == ref
                counts["confidence"] += answer.get("confiance") == truth.confiance
                why = answer.get("justification")
                counts["why"] += why == truth.justification
                counts["cites"] += isinstance(why, str) and _cited(why) == _cited(truth.justification)
            counts["exact"] += predicted == ref
            per[ref]["n"] += 1
            per[ref]["correct"] += predicted == ref
            confusion[ref][predicted] += 1
        n = len(examples)
        return {
            "n": n,
            "json_valid": counts["json_valid"] / n,
            "schema_valid": counts["schema_valid"] / n,
            "pathology_exact_match": counts["exact"] / n,
            "pathology_match_normalized": counts["normalized"] / n,
            "confidence_agreement": counts["confidence"] / n,
            "justification_agreement": counts["why"] / n,
            "justification_cites_signal": counts["cites"] / n,
            "per_pathology": {
                label: {"n": v["n"], "exact_match": v["correct"] / v["n"] if v["n"] else None}
                for label, v in per.items()
            },
            "confusion": confusion,
            "counts": counts,
        }


def _cited(text: str) -> set[str]:
    """The measurement names a justification mentions."""
    return {f for f in FIELDS if f in text}


def _parse(text: str) -> dict[str, Any] | None:
    """The answer as a JSON object, or None (empty, malformed, or not an object)."""
    try:
        value = json.loads(text.strip()) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
