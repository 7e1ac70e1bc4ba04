"""Scores on hand-made predictions: exact numbers for task metrics, free-text metrics and intervals."""

import json
import math

import pytest

from medtune.errors import DataError
from medtune.eval.metrics import (
    QaTask,
    bleu,
    bootstrap_ci,
    normalize_text,
    read_terms,
    rouge_l,
    score_predictions,
    terminology_coverage,
)
from medtune.tasks import get_task


def _answer(pathologie: str, confiance: str = "élevée") -> str:
    return json.dumps(
        {"pathologie": pathologie, "confiance": confiance, "justification": "x"}, ensure_ascii=False
    )


@pytest.fixture(scope="module")
def aria():
    return get_task("aria")


def test_aria_scores_malformed_empty_and_wrong_case_or_accents(aria):
    examples = aria.generate_test(6, seed=5)
    labels = [ex["label"] for ex in examples]
    predictions = [
        examples[0]["reference"],  # right
        '{"pathologie": "' + labels[1],  # cut JSON
        "",  # empty
        _answer(labels[3].upper()),  # wrong case
        _answer(normalize_text(labels[4])),  # accents and case stripped
        examples[5]["reference"],  # right
    ]
    m = score_predictions(aria, examples, predictions)
    assert m["json_valid"] == pytest.approx(4 / 6)
    assert m["schema_valid"] == pytest.approx(2 / 6)  # a label outside the enum breaks the schema
    assert m["pathology_exact_match"] == pytest.approx(2 / 6)
    assert m["pathology_match_normalized"] == pytest.approx(4 / 6)
    for name in ("pathology_exact_match", "json_valid", "schema_valid", "confidence_agreement"):
        low, high = m["ci"][name]
        assert 0.0 <= low <= m[name] <= high <= 1.0


def test_intervals_are_reproducible_and_tight_when_every_answer_is_right(aria):
    examples = aria.generate_test(40, seed=3)
    right = [ex["reference"] for ex in examples]
    m = score_predictions(aria, examples, right)
    assert m["pathology_exact_match"] == 1.0
    assert m["ci"]["pathology_exact_match"] == [1.0, 1.0]
    half = right[:20] + [""] * 20
    first = score_predictions(aria, examples, half)["ci"]
    assert first == score_predictions(aria, examples, half)["ci"]
    low, high = first["pathology_exact_match"]
    assert low < 0.5 < high and high - low < 0.5


def test_bootstrap_rescores_ratios_on_each_resample():
    # Sensitivity only looks at positive cases: all positives found -> [1, 1] whatever the negatives.
    def score(examples, predictions):
        pos = [p for e, p in zip(examples, predictions, strict=True) if e == "pos"]
        return {"sensitivity": sum(p == "pos" for p in pos) / len(pos) if pos else None}

    examples = ["pos"] * 10 + ["neg"] * 10
    predictions = ["pos"] * 10 + ["pos"] * 10
    assert bootstrap_ci(score, examples, predictions, ["sensitivity"]) == {"sensitivity": [1.0, 1.0]}


def test_predictions_must_match_examples(aria):
    with pytest.raises(DataError, match="3 examples but 2 predictions"):
        score_predictions(aria, aria.generate_test(3, seed=1), ["", ""])


def test_bleu_exact_values():
    assert bleu(["le patient a de la fièvre"], ["le patient a de la fièvre"]) == pytest.approx(1.0)
    assert bleu(["a b c d"], ["w x y z"]) == 0.0
    # All n-grams match, but the answer is 6 words for a 9-word reference: brevity penalty e^(1-9/6).
    short = bleu(["le patient a de la fièvre"], ["le patient a de la fièvre et des céphalées"])
    assert short == pytest.approx(math.exp(-0.5))


def test_rouge_l_exact_values_and_accented_words():
    # LCS 6 of 6 predicted and 9 reference words: P = 1, R = 2/3, F1 = 0.8.
    assert rouge_l(
        ["le patient a de la fièvre"], ["le patient a de la fièvre et des céphalées"]
    ) == pytest.approx(0.8)
    # rouge-score's own tokenizer would drop è and compare "fi vre"; accents and case are ignored here.
    assert rouge_l(["Fièvre élevée"], ["fievre elevee"]) == 1.0
    assert rouge_l(["fièvre"], ["céphalée"]) == 0.0
    assert rouge_l([""], ["fièvre"]) == 0.0


def test_terminology_coverage_counts_reference_terms_found_in_the_answer():
    terms = ["mélanome", "biopsie", "psoriasis"]
    predictions = ["Suspicion de MELANOME.", "", "Consultez un médecin."]
    references = ["Mélanome malin: biopsie excisionnelle.", "Psoriasis vulgaris", "Consultez."]
    # 1/2 of the first reference's terms, 0/1 of the second; the third has none and does not count.
    assert terminology_coverage(predictions, references, terms) == pytest.approx(0.25)
    assert terminology_coverage(["x"], ["rien"], terms) is None
    # Whole words only: "biopsies" is not the term "biopsie".
    assert terminology_coverage(["biopsies"], ["biopsie"], terms) == 0.0


def test_qa_task_scores_conversations_and_diagnosis():
    qa = QaTask(terms=["psoriasis", "plaques"])
    examples = [
        {
            "messages": [
                {"role": "user", "content": "Lésion érythémato-squameuse en plaques ?"},
                {"role": "assistant", "content": "Psoriasis vulgaris en plaques."},
            ],
            "label": "psoriasis",
        },
        {
            "messages": [{"role": "user", "content": "Critères ABCDE ?"}],
            "reference": "Asymétrie, bords, couleur.",
        },
    ]
    m = qa.score(examples, ["Psoriasis vulgaris en plaques.", ""])
    assert m["rouge_l"] == pytest.approx(0.5)
    assert m["terminology_coverage"] == 1.0
    assert m["diagnosis_match"] == 1.0
    assert m["empty"] == 0.5
    with pytest.raises(DataError, match="final assistant turn"):
        qa.score([{"messages": [{"role": "user", "content": "?"}]}], ["x"])


def test_term_list_file(tmp_path):
    f = tmp_path / "terms.txt"
    f.write_text("# dermatologie\nmélanome\n\nbiopsie\n", encoding="utf-8")
    assert read_terms(f) == ["mélanome", "biopsie"]
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_terms(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="cannot read"):
        read_terms(tmp_path / "missing.txt")


def test_headache_headline_metrics_get_intervals():
    headache = get_task("headache")
    examples = headache.generate_test(30, seed=2)
    m = score_predictions(headache, examples, [ex["reference"] for ex in examples])
    assert m["format_compliance"] == 1.0 and m["false_positive_rate"] == 0.0
    assert m["ci"]["red_flag_sensitivity"] == [1.0, 1.0]
    assert m["ci"]["false_positive_rate"] == [0.0, 0.0]
