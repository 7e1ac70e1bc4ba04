"""Scores: the task packs' own scorers, free-text Q&A metrics, and bootstrap confidence intervals.

    metrics = score_predictions(task, examples, predictions)      # task.score + "ci" on headline metrics
    qa = QaTask(terms=["mélanome", "psoriasis"]); qa.score(examples, predictions)

Free-text answers (the Doctis and dermatology seeds) are compared with their reference answers:
BLEU (sacrebleu, corpus level), ROUGE-L (rouge-score, mean F1) and terminology coverage (the share of
the reference's domain terms the answer also uses). All three are on a 0-1 scale (sacrebleu's 0-100
BLEU is divided by 100, as the dermatology seed reports it). Texts are compared case- and
accent-insensitively for terms, and tokenised Unicode-aware for ROUGE (rouge-score's default
tokenizer drops every non-ASCII letter, which would cut "fièvre" into "fi" and "vre").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medtune.errors import DataError

# Metrics that decide whether a model ships, per task: these get bootstrap intervals and lead reports.
HEADLINE: dict[str, list[str]] = {
    "aria": ["pathology_exact_match", "json_valid", "schema_valid", "confidence_agreement"],
    "headache": ["format_compliance", "question_accuracy", "red_flag_sensitivity", "false_positive_rate"],
    "qa": ["bleu", "rouge_l", "terminology_coverage", "diagnosis_match"],
}


def normalize_text(text: str) -> str:
    """Case-, accent- and whitespace-insensitive form: 'Élevée  ' -> 'elevee'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.split())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", normalize_text(text))


class _UnicodeTokenizer:
    """rouge-score tokenizer interface (`tokenize(text) -> list[str]`) keeping accented letters."""

    def tokenize(self, text: str) -> list[str]:
        return _words(text)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 13a tokenisation), 0-1."""
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_bleu(predictions, [references]).score / 100.0


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over answers, 0-1."""
    from rouge_score import rouge_scorer

    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
    return float(
        np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)])
    )


def _contains(text_words: str, term: str) -> bool:
    """Whole-word match of a (normalised) term in a (normalised, space-joined) word string."""
    term_words = " ".join(_words(term))
    return bool(term_words) and f" {term_words} " in f" {text_words} "


def terminology_coverage(predictions: list[str], references: list[str], terms: list[str]) -> float | None:
    """Mean over answers of (reference terms also in the answer) / (terms in the reference).

    Answers whose reference uses no listed term do not count; None when no reference uses any.
    """
    shares = []
    for pred, ref in zip(predictions, references, strict=True):
        ref_words, pred_words = " ".join(_words(ref)), " ".join(_words(pred))
        wanted = {t for t in terms if _contains(ref_words, t)}
        if wanted:
            shares.append(sum(_contains(pred_words, t) for t in wanted) / len(wanted))
    return float(np.mean(shares)) if shares else None


def read_terms(path: str | Path) -> list[str]:
    """A term list: one term per line, '#' comments and blank lines ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the term list: {exc.strerror}") from None
    terms = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not terms:
        raise DataError(f"{path}: the term list is empty (expected one term per line)")
    return terms


class QaTask:
    """Free-text medical Q&A (`--task qa`): conversation records whose last assistant turn is the
    reference answer. Quacks like `medtune.tasks.base.Task` for evaluation (messages, production
    settings, score); it has no generator because Q&A data comes from the user."""

    name: ClassVar[str] = "qa"
    labels: ClassVar[list[str]] = []

    def __init__(self, terms: list[str] | None = None, *, temperature: float = 0.0, max_tokens: int = 512):
        self.terms = terms or []
        self.temperature = temperature
        self.max_tokens = max_tokens

    def response_format(self) -> None:
        return None

    def validate_input(self, record: dict[str, Any]) -> dict[str, Any]:
        return record

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        raise DataError("qa examples carry their request as 'messages' (found only 'input')")

    @staticmethod
    def reference(example: dict[str, Any]) -> str:
        if isinstance(example.get("reference"), str):
            return example["reference"]
        messages = example.get("messages") or []
        if messages and messages[-1].get("role") == "assistant":
            return messages[-1]["content"]
        raise DataError("qa example: expected a final assistant turn or a 'reference' answer, found neither")

    def score(self, examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
        refs = [self.reference(ex) for ex in examples]
        metrics: dict[str, Any] = {
            "n": len(examples),
            "bleu": bleu(predictions, refs),
            "rouge_l": rouge_l(predictions, refs),
            "empty": sum(1 for p in predictions if not p.strip()) / max(len(predictions), 1),
        }
        if self.terms:
            metrics["terminology_coverage"] = terminology_coverage(predictions, refs, self.terms)
        labelled = [(ex["label"], p) for ex, p in zip(examples, predictions, strict=True) if ex.get("label")]
        if labelled:
            # Diagnostic precision: the expected diagnosis is named in the answer.
            hits = [_contains(" ".join(_words(p)), label) for label, p in labelled]
            metrics["diagnosis_match"] = sum(hits) / len(hits)
        return metrics


def headline_metrics(task_name: str, metrics: dict[str, Any]) -> list[str]:
    """The headline metric names present (and numeric) in `metrics`."""
    return [m for m in HEADLINE.get(task_name, []) if is_number(metrics.get(m))]


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def bootstrap_ci(
    score: Callable[[list[Any], list[str]], dict[str, Any]],
    examples: list[Any],
    predictions: list[str],
    metrics: list[str],
    *,
    resamples: int = 300,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap interval [low, high] for each metric: resample examples with replacement,
    rescore the whole resample with the task's own scorer (right for ratios such as sensitivity, whose
    denominator changes with the sample). Seeded: the same inputs give the same intervals."""
    n = len(examples)
    if n == 0 or not metrics:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        scored = score([examples[i] for i in idx], [predictions[i] for i in idx])
        for m in metrics:
            if is_number(scored.get(m)):
                samples[m].append(float(scored[m]))
    alpha = (1.0 - level) / 2.0
    return {
        m: [float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))] for m, v in samples.items() if v
    }


def score_predictions(
    task: Any,
    examples: list[dict[str, Any]],
    predictions: list[str],
    *,
    metrics: dict[str, Any] | None = None,
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """The task's metrics plus `ci` (95% bootstrap intervals on its headline metrics).

    Pass `metrics` when the task's scorer already ran on these predictions."""
    if len(examples) != len(predictions):
        raise DataError(f"{len(examples)} examples but {len(predictions)} predictions")
    result = dict(metrics) if metrics is not None else task.score(examples, predictions)
    headline = headline_metrics(task.name, result)
    result["ci"] = bootstrap_ci(task.score, examples, predictions, headline, resamples=resamples, seed=seed)
    return result
