"""ARIA task pack: labeller at every threshold, input validation, generators, scorer."""

from __future__ import annotations

import json
import re
from collections import Counter

import jsonschema
import pytest

from medtune.errors import ConfigError, DataError
from medtune.tasks import get_task
from medtune.tasks.aria_rules import NO_PATHOLOGY, THRESHOLDS, diagnose

TASK = get_task("aria")

# A healthy runner: every signal clearly below its threshold (closest: pronation 4.0 vs 6, 33% below).
HEALTHY = {
    "inclinaison_tronc": 3.0,
    "valgus_genou": 5.0,
    "adduction_hanche": 5.0,
    "longueur_foulée": 0.85,
    "pronation_pied": 4.0,
    "heel_strike_index": 0.3,
    "dorsiflexion_max": 8.0,
}
SINGLE = [
    ("inclinaison_tronc", 7.0, 0.1, "Lombalgie mécanique"),
    ("valgus_genou", 10.0, 0.1, "Syndrome fémoro-patellaire (SFP)"),
    ("adduction_hanche", 10.0, 0.1, "Syndrome bandelette ilio-tibiale (SBIT)"),
    ("longueur_foulée", 1.35, 0.01, "Périostite tibiale"),
    ("pronation_pied", 6.0, 0.1, "Fasciite plantaire"),
]


def case(**values: float) -> dict:
    return HEALTHY | values


@pytest.mark.parametrize(("field", "threshold", "step", "pathology"), SINGLE)
def test_each_threshold_fires_only_strictly_above(field, threshold, step, pathology):
    assert TASK.label(case(**{field: round(threshold - step, 2)})) == NO_PATHOLOGY
    assert TASK.label(case(**{field: threshold})) == NO_PATHOLOGY  # equal is not above
    assert TASK.label(case(**{field: round(threshold + step, 2)})) == pathology


def test_achilles_needs_both_halves():
    achille = "Tendinite Achille"
    assert TASK.label(case(heel_strike_index=0.71, dorsiflexion_max=15.1)) == achille
    # Each half alone, however high, is not enough.
    assert TASK.label(case(heel_strike_index=0.95, dorsiflexion_max=14.9)) == NO_PATHOLOGY
    assert TASK.label(case(heel_strike_index=0.69, dorsiflexion_max=25.0)) == NO_PATHOLOGY
    # At the thresholds exactly: not above.
    assert TASK.label(case(heel_strike_index=0.7, dorsiflexion_max=20.0)) == NO_PATHOLOGY
    assert TASK.label(case(heel_strike_index=0.9, dorsiflexion_max=15.0)) == NO_PATHOLOGY


def test_achilles_exceedance_is_the_weaker_half():
    # heel 0.77 is +10%, dorsiflexion 24 is +60%: Achille counts +10% -> modérée.
    d = diagnose(TASK.validate_input(case(heel_strike_index=0.77, dorsiflexion_max=24.0)))
    assert (d.pathologie, d.confiance) == ("Tendinite Achille", "modérée")
    assert d.margin == pytest.approx(0.1)
    # A trunk lean of +20% then beats Achille's weaker half.
    assert TASK.label(case(heel_strike_index=0.77, dorsiflexion_max=24.0, inclinaison_tronc=8.4)) == (
        "Lombalgie mécanique"
    )


def test_primary_is_largest_relative_exceedance_not_largest_absolute():
    # valgus 12 is +2° (+20%); stride 1.70 is only +0.35 m but +25.9%: stride wins.
    d = diagnose(TASK.validate_input(case(valgus_genou=12.0, **{"longueur_foulée": 1.70})))
    assert d.pathologie == "Périostite tibiale"
    assert set(d.exceedances) == {"Périostite tibiale", "Syndrome fémoro-patellaire (SFP)"}
    # Three signals: pronation +50% beats trunk +28.6% and adduction +30%.
    assert TASK.label(case(pronation_pied=9.0, inclinaison_tronc=9.0, adduction_hanche=13.0)) == (
        "Fasciite plantaire"
    )


def test_exact_tie_goes_to_table_order():
    # valgus and adduction share the 10° threshold: equal values tie, SFP comes first in the table.
    assert TASK.label(case(valgus_genou=12.0, adduction_hanche=12.0)) == "Syndrome fémoro-patellaire (SFP)"


@pytest.mark.parametrize(
    ("value", "confidence"),
    [
        (7.1, "faible"),
        (7.6, "faible"),
        (7.7, "modérée"),
        (8.7, "modérée"),
        (8.75, "élevée"),
        (11.0, "élevée"),
    ],
)
def test_confidence_cut_offs_on_exceedance(value, confidence):
    # 7.7 is exactly +10% and 8.75 exactly +25%: both land on the higher side.
    d = diagnose(TASK.validate_input(case(inclinaison_tronc=value)))
    assert d.confiance == confidence


@pytest.mark.parametrize(
    ("pronation", "confidence"),
    [(4.5, "élevée"), (4.6, "modérée"), (5.4, "modérée"), (5.5, "faible"), (6.0, "faible")],
)
def test_no_pathology_confidence_from_closest_signal(pronation, confidence):
    # Pronation is the closest signal: 4.5 is 25% below 6, 5.4 is 10% below, 6.0 is at it.
    d = diagnose(TASK.validate_input(case(pronation_pied=pronation)))
    assert (d.pathologie, d.confiance) == (NO_PATHOLOGY, confidence)
    assert "pronation_pied" in d.justification


def test_reference_answer_is_compact_json_citing_the_signal():
    text = TASK.reference_answer(case(valgus_genou=11.3))
    assert text == (
        '{"pathologie": "Syndrome fémoro-patellaire (SFP)", "confiance": "modérée", '
        '"justification": "valgus_genou 11.3° > 10°"}'
    )
    achille = json.loads(TASK.reference_answer(case(heel_strike_index=0.82, dorsiflexion_max=17.2)))
    assert achille["justification"] == "heel_strike_index 0.82 > 0.7 et dorsiflexion_max 17.2° > 15°"


def test_prompt_lists_every_measurement_and_shows_deciding_digits():
    prompt = TASK.render_prompt(case(inclinaison_tronc=7.04, age=34, sexe="femme", km_semaine=40))
    # not rounded to 7.0: that would hide the decision; the gap to the threshold is shown signed
    assert "inclinaison_tronc: 7.04° (seuil 7°, +0.6%)" in prompt
    assert "longueur_foulée: 0.85 m (seuil 1.35 m, -37.0%)" in prompt
    assert "heel_strike_index: 0.30 (seuil 0.7, -57.1%)" in prompt
    assert "Coureur: 34 ans, femme, 40 km/semaine" in prompt
    assert TASK.label(case(inclinaison_tronc=7.04)) == "Lombalgie mécanique"


def test_prompt_gap_never_hides_which_side_of_the_threshold():
    at = TASK.render_prompt(case(valgus_genou=10.0))
    assert "valgus_genou: 10.0° (seuil 10°, 0.0%)" in at
    just_above = TASK.render_prompt(case(valgus_genou=10.001))
    assert "(seuil 10°, +0.010%)" in just_above
    assert TASK.label(case(valgus_genou=10.001)) == "Syndrome fémoro-patellaire (SFP)"


def test_validate_input_accepts_aliases_and_strings():
    record = dict(HEALTHY)
    record["longueur_foulee"] = record.pop("longueur_foulée")
    record["valgus_genou"] = "10,5"  # CSV cell with a decimal comma
    out = TASK.validate_input(record)
    assert out["longueur_foulée"] == 0.85 and out["valgus_genou"] == 10.5


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({k: v for k, v in HEALTHY.items() if k != "pronation_pied"}, "'pronation_pied' is missing"),
        (case(valgus_genou="beaucoup"), "'valgus_genou': expected a number, found 'beaucoup'"),
        (case(heel_strike_index=1.4), "'heel_strike_index': 1.4 is outside the plausible range [0, 1]"),
        (case(dorsiflexion_max=float("nan")), "'dorsiflexion_max': expected a finite number"),
        (case(sexe="x"), "'sexe': expected F or H"),
        ({**{k: v for k, v in HEALTHY.items() if k != "valgus_genou"}, "valgus_genoux": 3}, "did you mean"),
    ],
)
def test_validate_input_names_the_bad_field(record, message):
    with pytest.raises(DataError) as err:
        TASK.validate_input(record)
    assert message in str(err.value)


def test_generator_is_deterministic_and_balanced():
    a, b = TASK.generate_inputs(700, seed=3), TASK.generate_inputs(700, seed=3)
    assert a == b
    assert a != TASK.generate_inputs(700, seed=4)
    counts = Counter(TASK.label(r) for r in a)
    assert set(counts) == set(TASK.labels) and set(counts.values()) == {100}


def test_generator_covers_the_boundaries():
    records = TASK.generate_inputs(1400, seed=5)
    diagnoses = [diagnose(r) for r in records]
    near = sum(abs(d.margin) < 0.10 for d in diagnoses) / len(records)
    assert 0.25 <= near <= 0.45  # decisive margin within 10% of a threshold
    assert sum(len(d.exceedances) > 1 for d in diagnoses) / len(records) >= 0.2  # multi-signal
    at_threshold = sum(any(r[f] == thr for f, thr in THRESHOLDS.items()) for r in records)
    assert at_threshold >= 50  # exact threshold values, which must not fire
    half_achille = sum((r["heel_strike_index"] > 0.7) != (r["dorsiflexion_max"] > 15) for r in records)
    assert half_achille >= 50
    assert Counter(d.confiance for d in diagnoses).most_common()[-1][1] >= 0.2 * len(records)


def test_hard_share_draws_more_competing_signals_for_training_only():
    def multi(records):
        return sum(len(diagnose(r).exceedances) > 1 for r in records) / len(records)

    default = TASK.generate_inputs(1400, seed=5)
    assert TASK.generate_inputs(1400, seed=5, hard_share=None) == default
    hard = TASK.generate_inputs(1400, seed=5, hard_share=0.9)
    assert multi(hard) > multi(default) + 0.15
    assert Counter(TASK.label(r) for r in hard) == Counter(TASK.label(r) for r in default)  # still balanced
    sft = TASK.generate_sft(70, seed=5, hard_share=0.9)
    assert [e["input"] for e in sft] == TASK.generate_inputs(70, seed=5, hard_share=0.9)
    with pytest.raises(ConfigError, match="headache task has no such setting"):
        get_task("headache").generate_sft(10, seed=1, hard_share=0.5)


def test_generator_measurements_are_correlated_and_plausible():
    records = TASK.generate_inputs(1400, seed=6)
    for r in records:
        TASK.validate_input(r)

    def corr(x: str, y: str) -> float:
        xs, ys = [r[x] for r in records], [r[y] for r in records]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
        return cov / (sum((a - mx) ** 2 for a in xs) * sum((b - my) ** 2 for b in ys)) ** 0.5

    assert corr("valgus_genou", "adduction_hanche") > 0.4
    assert corr("heel_strike_index", "dorsiflexion_max") > 0.4


def test_sft_examples_validate_against_the_output_schema():
    schema = TASK.output_schema()
    examples = TASK.generate_sft(140, seed=1)
    for ex in examples:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = json.loads(ex["messages"][-1]["content"])
        jsonschema.validate(answer, schema)
        assert list(answer) == ["pathologie", "confiance", "justification"]
        assert answer["pathologie"] == ex["label"] and len(answer["justification"]) <= 120
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"pathologie": "Grippe", "confiance": "faible", "justification": ""}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"pathologie": NO_PATHOLOGY, "confiance": "faible"}, schema)


def test_dpo_rejected_answers_are_wrong_in_each_way():
    triplets = TASK.generate_dpo(80, seed=2)
    assert triplets == TASK.generate_dpo(80, seed=2)
    assert Counter(t["rejected_kind"] for t in triplets) == {
        "wrong_pathology": 20,
        "wrong_confidence": 20,
        "wrong_signal": 20,
        "invalid_json": 20,
    }
    for t in triplets:
        chosen, rejected = t["chosen"][0]["content"], t["rejected"][0]["content"]
        assert chosen != rejected
        good = json.loads(chosen)
        kind = t["rejected_kind"]
        if kind == "invalid_json":
            with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
                jsonschema.validate(json.loads(rejected), TASK.output_schema())
            continue
        bad = json.loads(rejected)
        changed = {k for k in good if good[k] != bad[k]}
        expected = {
            "wrong_pathology": {"pathologie", "justification"},
            "wrong_confidence": {"confiance"},
            "wrong_signal": {"justification"},
        }[kind]
        assert changed == expected


def test_reports_are_structured_french_and_use_production_settings():
    reports = TASK.generate_reports(14, seed=1)
    assert TASK.report_temperature == 0.3 and TASK.report_max_tokens == 2048
    assert TASK.temperature == 0.1 and TASK.max_tokens == 256
    for ex in reports:
        text = ex["messages"][-1]["content"]
        assert text.startswith("Rapport biomécanique\nDiagnostic: " + ex["label"])
        assert "Conseils:" in text and "Suivi:" in text
    assert TASK.response_format()["json_schema"]["name"] == "diagnostic"


def _examples():
    cases = [
        case(inclinaison_tronc=9.0),  # Lombalgie, élevée
        case(valgus_genou=10.5),  # SFP, faible
        case(heel_strike_index=0.8, dorsiflexion_max=17.0),  # Achille, modérée
        case(),  # Aucune pathologie, élevée
        case(pronation_pied=6.4),  # Fasciite, faible
    ]
    return [{"input": c, "label": TASK.label(c), "reference": TASK.reference_answer(c)} for c in cases]


def test_score_on_hand_made_predictions():
    examples = _examples()
    predictions = [
        examples[0]["reference"],  # perfect
        '{"pathologie": "syndrome femoro-patellaire (SFP)", "confiance": "faible", "justification": "x"}',
        '{"pathologie": "Tendinite Achille", "confiance": "élevée", "justification": "x"',  # malformed
        "",  # empty
        '{"pathologie": "Lombalgie mécanique", "confiance": "faible", "justification": "x", "extra": 1}',
    ]
    m = TASK.score(examples, predictions)
    assert m["n"] == 5
    assert m["json_valid"] == pytest.approx(3 / 5)
    assert m["schema_valid"] == pytest.approx(1 / 5)  # wrong case leaves the enum; extra key is refused
    assert m["pathology_exact_match"] == pytest.approx(1 / 5)
    assert m["pathology_match_normalized"] == pytest.approx(2 / 5)  # case and accents forgiven
    assert m["confidence_agreement"] == pytest.approx(3 / 5)
    assert m["justification_agreement"] == pytest.approx(1 / 5)  # "x" is nobody's justification
    assert m["justification_cites_signal"] == pytest.approx(1 / 5)
    assert m["per_pathology"]["Lombalgie mécanique"] == {"n": 1, "exact_match": 1.0}
    assert m["per_pathology"]["Tendinite Achille"] == {"n": 1, "exact_match": 0.0}
    assert m["per_pathology"]["Périostite tibiale"] == {"n": 0, "exact_match": None}
    confusion = m["confusion"]
    assert confusion["Lombalgie mécanique"]["Lombalgie mécanique"] == 1
    assert confusion["Syndrome fémoro-patellaire (SFP)"]["invalid"] == 1
    assert confusion["Tendinite Achille"]["invalid"] == 1
    assert confusion[NO_PATHOLOGY]["invalid"] == 1
    assert confusion["Fasciite plantaire"]["Lombalgie mécanique"] == 1
    assert sum(sum(row.values()) for row in confusion.values()) == 5


def test_score_perfect_predictions_and_bad_calls():
    tests = TASK.generate_test(70, seed=9)
    m = TASK.score(tests, [t["reference"] for t in tests])
    assert m["pathology_exact_match"] == m["schema_valid"] == m["confidence_agreement"] == 1.0
    assert m["justification_agreement"] == m["justification_cites_signal"] == 1.0
    # The measurement named in pieces (what the serving guide once forced), or its value miscopied.
    spelt_out = [t["reference"].replace("valgus_genou", "v a l g u s") for t in tests]
    spelt = TASK.score(tests, spelt_out)
    assert spelt["justification_agreement"] == spelt["justification_cites_signal"] < 1.0
    miscopied = [re.sub(r"\d\.\d°", "0.0°", t["reference"]) for t in tests]
    wrong_values = TASK.score(tests, miscopied)
    assert wrong_values["justification_agreement"] < wrong_values["justification_cites_signal"] == 1.0
    with pytest.raises(DataError, match="2 examples but 1 predictions"):
        TASK.score(tests[:2], ["{}"])
    with pytest.raises(DataError, match="no examples"):
        TASK.score([], [])
