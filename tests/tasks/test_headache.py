"""Headache task pack: negations, every red flag, key facts, generators, DPO pairs, scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from medtune.errors import DataError
from medtune.tasks import get_task
from medtune.tasks.headache_rules import CLARIFY_ANSWER, NON_URGENT_ANSWER, QUESTIONS, analyse

TASK = get_task("headache")
# All three key facts known, no red flag: the base every red-flag case below adds one finding to.
CALM = (
    "patiente 34 ans, céphalées pulsatiles depuis 3 jours, pas de fièvre, examen neurologique normal, "
    "sans antécédent"
)


def label(text: str) -> str:
    return TASK.label({"case": text})


@pytest.mark.parametrize(
    "negated",
    [
        "pas de fièvre",
        "absence de fièvre",
        "sans fièvre",
        "apyrétique",
        "fièvre: non",
        "non fébrile",
        "elle n'a pas de fièvre",
        "nie toute fièvre",
        "fièvre absente",
        "pas de vomissements ni fièvre",
    ],
)
def test_negated_fever_is_not_a_red_flag(negated):
    text = CALM.replace("pas de fièvre", negated)
    a = analyse(text)
    assert "fièvre" in a.absent
    assert a.label == "no_red_flag"


@pytest.mark.parametrize(
    ("finding", "flag"),
    [
        ("déficit moteur du bras droit", "déficit neurologique focal"),
        ("hémiparésie gauche", "déficit neurologique focal"),
        ("fièvre à 39°C", "fièvre"),
        ("début brutal", "début brutal"),
        ("céphalée en coup de tonnerre", "début brutal"),
        ("raideur de nuque", "raideur de nuque"),
        ("crise convulsive", "crise convulsive"),
        ("perte de connaissance", "perte de connaissance"),
        ("enceinte de 30 semaines", "grossesse/post-partum"),
        ("en post-partum", "grossesse/post-partum"),
        ("antécédent de cancer du sein", "cancer"),
        ("immunodéprimée (VIH)", "immunodépression"),
        ("traumatisme crânien hier", "traumatisme crânien"),
    ],
)
def test_each_red_flag_is_detected_with_its_reason(finding, flag):
    text = f"{CALM}, {finding}"
    assert analyse(text).red_flags == [flag]
    answer = TASK.reference_answer({"case": text})
    assert answer.startswith("Recommandation: IRM cérébrale en urgence (signes d'alerte: " + flag + ")")
    assert "suspicion" in answer and answer.endswith("Source: HAS/SFETD 2017.")


def test_negation_scope_stops_at_the_clause():
    assert analyse("pas de fièvre, déficit moteur droit").red_flags == ["déficit neurologique focal"]
    assert analyse("pas de fièvre mais raideur de nuque").red_flags == ["raideur de nuque"]
    a = analyse("sans fièvre ni raideur de nuque ni déficit")
    assert a.red_flags == [] and {"fièvre", "raideur de nuque", "déficit neurologique focal"} <= a.absent
    # A clause opened by "ni" carries the negation over the comma.
    assert analyse("pas de fièvre, ni raideur de nuque").red_flags == []
    assert analyse("céphalées non brutales").red_flags == []
    # Pregnancy negated by the verb.
    assert analyse(f"{CALM}, elle n'est pas enceinte").label == "no_red_flag"


def test_new_headache_after_fifty_is_a_red_flag_but_a_chronic_one_is_not():
    tail = "pas de fièvre, examen neurologique normal, sans antécédent"
    assert analyse(f"patient 62 ans, céphalées progressives depuis 2 semaines, {tail}").red_flags == [
        "céphalée récente après 50 ans"
    ]
    assert label(f"patient 62 ans, céphalées habituelles depuis des années, {tail}") == "no_red_flag"
    assert label(f"patient 50 ans, céphalées progressives depuis 2 semaines, {tail}") == "no_red_flag"
    # Onset unknown: ask rather than guess.
    assert label(f"patient 62 ans, céphalées, {tail}") == "clarify"
    # "depuis 12 ans" is a duration, not the age.
    assert analyse("patient 30 ans, céphalées chroniques depuis 12 ans").age == 30


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("patient 22 ans, céphalées", ["q1", "q2", "q3"]),
        (
            "patient 22 ans, céphalées depuis 2 jours, pas de fièvre, sans antécédent",
            ["q2"],
        ),  # deficit unknown
        ("patient 22 ans, céphalées depuis 2 jours, pas de fièvre ni déficit", ["q3"]),
        ("patient 22 ans, céphalées, apyrétique, aucun déficit, sans antécédent", ["q1"]),
    ],
)
def test_missing_key_facts_ask_the_three_questions(text, missing):
    a = analyse(text)
    assert a.missing == missing and a.label == "clarify"
    answer = TASK.reference_answer({"case": text})
    assert answer == CLARIFY_ANSWER and answer.count("?") == 3
    assert answer.startswith("Pour préciser: " + QUESTIONS[0])


def test_a_red_flag_wins_over_missing_facts():
    assert label("patiente 30 ans, céphalées brutales en coup de tonnerre") == "red_flag"


@pytest.mark.parametrize(
    "hedged",
    [
        "fièvre non mesurée",
        "sensation de fièvre",
        "possible perte de connaissance",
        "convulsions ?",
        "raideur de nuque douteuse",
    ],
)
def test_hedged_red_flags_are_ambiguous_and_handled_as_urgent(hedged):
    text = f"{CALM}, {hedged}"
    assert label(text) == "ambiguous"
    answer = TASK.reference_answer({"case": text})
    assert answer.startswith(
        "Recommandation: IRM cérébrale en urgence (signe d'alerte possible, à confirmer: "
    )


def test_no_red_flag_answer_is_non_urgent():
    assert TASK.reference_answer({"case": CALM}) == NON_URGENT_ANSWER
    assert NON_URGENT_ANSWER.startswith("Recommandation: pas d'imagerie en urgence")


def test_prompt_and_input_validation():
    prompt = TASK.render_prompt({"case": "  patient 22 ans, céphalées "})
    assert prompt.startswith("CAS CLINIQUE:\npatient 22 ans, céphalées\n\nRÉPONDS en français")
    for bad, message in [
        ({}, "'case' is missing"),
        ({"case": "  "}, "non-empty"),
        ({"case": 3}, "non-empty"),
    ]:
        with pytest.raises(DataError, match=message):
            TASK.validate_input(bad)
    assert TASK.validate_input({"cas": "x", "facts": {"age": 3}}) == {"case": "x", "facts": {"age": 3}}


def test_generator_is_deterministic_balanced_and_augmented():
    cases = TASK.generate_inputs(500, seed=3)
    assert cases == TASK.generate_inputs(500, seed=3) and cases != TASK.generate_inputs(500, seed=4)
    counts = Counter(label(c["case"]) for c in cases)
    assert counts == {"clarify": 200, "red_flag": 150, "no_red_flag": 100, "ambiguous": 50}
    text = "\n".join(c["case"] for c in cases)
    for variant in [
        "patient ",
        "patiente ",
        "céphalées",
        "maux de tête",
        " chez ",
        "pas de ",
        "absence de ",
        "sans ",
    ]:
        assert variant in text, variant
    for variant in [": non", " ni ", "apyrétique", "examen neurologique normal", "n'est pas enceinte"]:
        assert variant in text, variant
    # Facts come in different orders: fever is not always mentioned before the deficit.
    orders = Counter(
        t.find("fièvre") < t.find("déficit")
        for t in (c["case"] for c in cases)
        if "fièvre" in t and "déficit" in t
    )
    assert orders[True] > 10 and orders[False] > 10
    # Red-flag cases also carry negated findings, so presence must be told from negation.
    assert sum(label(t) == "red_flag" and bool(analyse(t).absent) for t in text.split("\n")) > 50


def test_sft_examples_carry_reference_answers():
    for ex in TASK.generate_sft(80, seed=1):
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = ex["messages"][-1]["content"]
        assert answer.startswith(("Pour préciser:", "Recommandation:"))
        assert answer == TASK.reference_answer(ex["input"]) and ex["label"] == label(ex["input"]["case"])


def test_dpo_rejected_answers_score_worse_than_chosen():
    triplets = TASK.generate_dpo(90, seed=2)
    assert triplets == TASK.generate_dpo(90, seed=2)
    assert Counter(t["rejected_kind"] for t in triplets) == {
        "wrong_decision": 30,
        "bad_format": 30,
        "bad_questions": 30,
    }
    examples = [
        {"input": {"case": t["prompt"][-1]["content"].split("\n")[1]}, "label": t["label"]} for t in triplets
    ]
    chosen = TASK.score(examples, [t["chosen"][0]["content"] for t in triplets])
    rejected = TASK.score(examples, [t["rejected"][0]["content"] for t in triplets])
    assert chosen["decision_accuracy"] == chosen["format_compliance"] == 1.0
    for t, ex in zip(triplets, examples, strict=True):
        assert t["chosen"] != t["rejected"]
        one_good = TASK.score([ex], [t["chosen"][0]["content"]])
        one_bad = TASK.score([ex], [t["rejected"][0]["content"]])
        # Every rejected answer loses on the decision, the format or the questions.
        worse = (
            one_bad["decision_accuracy"] < one_good["decision_accuracy"]
            or one_bad["format_compliance"] < one_good["format_compliance"]
            or (one_bad["question_accuracy"] or 0) < (one_good["question_accuracy"] or 0)
        )
        assert worse, (t["rejected_kind"], t["rejected"])
    assert rejected["decision_accuracy"] < 0.8


def test_score_on_hand_made_predictions():
    cases = [
        ("patient 22 ans, céphalées", "clarify"),
        ("patiente 40 ans, maux de tête", "clarify"),
        (f"{CALM}, raideur de nuque", "red_flag"),
        (f"{CALM}, fièvre non mesurée", "ambiguous"),
        (CALM, "no_red_flag"),
        (
            "homme 45 ans, céphalées depuis 2 jours, sans fièvre, aucun déficit, pas d'antécédent",
            "no_red_flag",
        ),
    ]
    examples = [{"input": {"case": c}, "label": lab} for c, lab in cases]
    for c, lab in cases:
        assert label(c) == lab
    predictions = [
        CLARIFY_ANSWER,  # right
        "Pour préciser: Depuis quand ? | Fièvre ?",  # two questions: right decision, wrong format
        "",  # empty: wrong everywhere
        "Recommandation: IRM cérébrale en urgence.",  # detected
        "Recommandation: IRM cérébrale non urgente, traitement symptomatique.",  # right
        "Recommandation: IRM en urgence (fièvre).",  # a false positive (fever was negated)
    ]
    m = TASK.score(examples, predictions)
    assert m["n"] == 6
    assert m["format_compliance"] == pytest.approx(4 / 6)
    assert m["question_accuracy"] == pytest.approx(1 / 2)
    assert m["red_flag_sensitivity"] == pytest.approx(1 / 2)
    assert m["false_positive_rate"] == pytest.approx(1 / 4)
    assert m["decision_accuracy"] == pytest.approx(4 / 6)
    assert m["per_label"]["clarify"] == {"n": 2, "decision_accuracy": 1.0}
    assert m["per_label"]["red_flag"] == {"n": 1, "decision_accuracy": 0.0}
    assert m["per_label"]["no_red_flag"] == {"n": 2, "decision_accuracy": 0.5}


def test_score_is_strict_about_prefix_case_and_question_content():
    examples = [{"input": {"case": "patient 22 ans, céphalées"}, "label": "clarify"}] * 3
    wrong_case = CLARIFY_ANSWER.replace("Pour préciser:", "pour préciser:")
    swapped = "Pour préciser: " + " | ".join([QUESTIONS[1], QUESTIONS[0], QUESTIONS[2]])
    m = TASK.score(examples, [wrong_case, swapped, CLARIFY_ANSWER])
    assert m["format_compliance"] == pytest.approx(2 / 3)  # the swapped one still has three questions
    assert m["question_accuracy"] == pytest.approx(1 / 3)  # but not the standard ones in order
    assert m["red_flag_sensitivity"] is None  # no red-flag case to detect
    with pytest.raises(DataError, match="1 examples but 2 predictions"):
        TASK.score(examples[:1], ["a", "b"])


def test_clarify_answer_has_exactly_three_standard_questions():
    assert len(re.findall(r"\?", CLARIFY_ANSWER)) == 3
    assert CLARIFY_ANSWER.split(": ", 1)[1].split(" | ") == QUESTIONS
