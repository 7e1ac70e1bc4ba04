"""Seeded synthetic ARIA data: correlated running measurements, DPO corruptions, report examples.

    records = generate_inputs(1500, seed=1)      # balanced over the 7 labels, deterministic
    rejected = corrupt_answer(record, "wrong_signal", rng)

How measurements are made (so a small model sees the boundaries it must learn):

- A runner is drawn from three latent factors: knee control (valgus, hip adduction and foot pronation
  rise together), stride (longer strides come with more heel strike and ankle dorsiflexion) and
  posture (trunk lean, slightly linked to stride). Values are kept in plausible ranges.
- Each case is built for a target label (exact quotas over the 7 labels). The decisive margin is
  drawn from a mixture: P_NEAR = 30% within 10% of a threshold (confiance "faible"), 27% at 10-25%
  ("modérée"), the rest beyond ("élevée"). Values are rounded to display precision, and exact
  threshold values (7.0, 1.35, ...) appear: they do not fire. Measured on 1500 cases: ~37% have their
  decisive margin within 10%, ~50% have two or more signals firing (P_MULTI plus correlated partners),
  ~12% have one Achilles half above its threshold without the other.
- P_DISTRACTOR = 35% of cases also get a non-deciding signal placed just below or at its threshold.
- Every case is re-labelled by the rules after rounding; a draw that misses its target is redrawn.
"""

from __future__ import annotations

import json
import random
from typing import Any

from medtune.tasks.aria_rules import (
    CONFIDENCES,
    FIELDS,
    LABELS,
    NO_PATHOLOGY,
    PATHOLOGIES,
    SIGNALS,
    THRESHOLDS,
    diagnose,
    fmt,
    fmt_threshold,
)
from medtune.tasks.base import label_quotas

# Largest relative exceedance drawn per field, so values stay plausible (heel_strike_index <= 1).
MAX_REL = {f: 0.6 for f in THRESHOLDS} | {"longueur_foulée": 0.35, "heel_strike_index": 0.42}
P_NEAR = 0.30  # share of cases whose decisive margin is within 10% of a threshold
P_MULTI = 0.30
P_DISTRACTOR = 0.35
P_EXACT = 0.15  # share of distractors placed exactly at the threshold
REJECTION_KINDS = ["wrong_pathology", "wrong_confidence", "wrong_signal", "invalid_json"]


# Spread of each measurement in the runner population, and the correlations between measurements
# that move together (knee control: valgus, hip adduction, pronation; stride: length, heel strike,
# dorsiflexion). Moving one value drags its partners along, so generated cases keep these links.
SD = {
    "inclinaison_tronc": 1.2,
    "valgus_genou": 1.9,
    "adduction_hanche": 1.75,
    "longueur_foulée": 0.08,
    "pronation_pied": 1.1,
    "heel_strike_index": 0.13,
    "dorsiflexion_max": 1.8,
}
RHO = {
    ("valgus_genou", "adduction_hanche"): 0.6,
    ("valgus_genou", "pronation_pied"): 0.45,
    ("adduction_hanche", "pronation_pied"): 0.35,
    ("longueur_foulée", "heel_strike_index"): 0.5,
    ("longueur_foulée", "dorsiflexion_max"): 0.4,
    ("heel_strike_index", "dorsiflexion_max"): 0.6,
}


def _runner(rng: random.Random) -> dict[str, float]:
    """Correlated, mostly healthy measurements (most below their thresholds)."""
    knee, stride, posture = rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(0, 1)
    e = lambda s: rng.gauss(0, s)  # noqa: E731
    return {
        "inclinaison_tronc": 4.5 + 1.1 * posture + 0.3 * stride + e(0.5),
        "valgus_genou": 6.0 + 1.7 * knee + e(0.9),
        "adduction_hanche": 6.5 + 1.5 * knee + e(0.9),
        "longueur_foulée": 1.15 + 0.07 * stride + e(0.03),
        "pronation_pied": 3.6 + 0.9 * knee + e(0.6),
        "heel_strike_index": min(0.98, max(0.05, 0.45 + 0.11 * stride + e(0.06))),
        "dorsiflexion_max": 11.5 + 1.4 * stride + e(1.0),
    }


def _margin(rng: random.Random, field: str) -> float:
    """A decisive relative margin from the near / moderate / clear mixture."""
    u = rng.random()
    if u < P_NEAR:
        return rng.uniform(0.005, 0.0999)
    if u < P_NEAR + 0.27:
        return rng.uniform(0.10, 0.249)
    return rng.uniform(0.25, MAX_REL[field])


def _move(values: dict[str, float], field: str, rel: float, frozen: set[str]) -> None:
    """Set `field` to relative exceedance `rel`, dragging its correlated partners (not `frozen`)."""
    new = THRESHOLDS[field] * (1 + rel)
    dz = (new - values[field]) / SD[field]
    values[field] = new
    for (a, b), rho in RHO.items():
        for x, y in ((a, b), (b, a)):
            if x == field and y not in frozen:
                values[y] += rho * dz * SD[y]


def _set_rel(values: dict[str, float], field: str, rel: float) -> None:
    values[field] = THRESHOLDS[field] * (1 + rel)


def _exceedance(values: dict[str, float], pathology: str) -> float | None:
    signal = SIGNALS[pathology]
    if all(values[f] > thr for f, thr in signal.items()):
        return min((values[f] - thr) / thr for f, thr in signal.items())
    return None


def _below(rng: random.Random, values: dict[str, float], pathology: str) -> None:
    """Make `pathology` not fire: push one of its fields clearly below its threshold."""
    _set_rel(values, rng.choice(sorted(SIGNALS[pathology])), -rng.uniform(0.02, 0.35))


def _round(values: dict[str, float]) -> dict[str, float]:
    out = {}
    for f, v in values.items():
        spec = FIELDS[f]
        out[f] = round(min(spec.high, max(spec.low, v)), spec.decimals)
    return out


def _draw(rng: random.Random, target: str, p_multi: float = P_MULTI) -> dict[str, float]:
    values = _runner(rng)
    others = [p for p in PATHOLOGIES if p != target]
    frozen: set[str] = set()
    top = 0.0  # other pathologies may fire only below this exceedance
    if target != NO_PATHOLOGY:
        fields = sorted(SIGNALS[target])
        rng.shuffle(fields)  # Achille: either half may be the one carrying the decisive margin
        top = min(_margin(rng, f) for f in fields)
        frozen |= set(fields)
        for i, f in enumerate(fields):
            _move(values, f, top if i == 0 else rng.uniform(top, max(top, MAX_REL[f])), frozen)
        if rng.random() < p_multi:
            second = rng.choice(others)
            frozen |= set(SIGNALS[second])
            for f in SIGNALS[second]:
                _move(values, f, top * rng.uniform(0.15, 0.75), frozen)
    else:
        if rng.random() < P_NEAR:
            # The closest signal sits within 10% below (or exactly at) its threshold.
            near = rng.choice(PATHOLOGIES)
            fields = sorted(SIGNALS[near])
            rng.shuffle(fields)
            frozen |= set(fields)
            _move(values, fields[0], 0.0 if rng.random() < P_EXACT else -rng.uniform(0.0, 0.0999), frozen)
            for f in fields[1:]:  # Achille: the other half may fire alone, which is not enough
                _move(values, f, rng.uniform(-0.1, MAX_REL[f]), frozen)
        else:
            for f in THRESHOLDS:
                values[f] = min(values[f], THRESHOLDS[f] * (1 - rng.uniform(0.10, 0.30)))
            if rng.random() < 0.4:  # Achille is judged on its weaker half: one half may rise freely
                half = rng.choice(sorted(SIGNALS["Tendinite Achille"]))
                _set_rel(values, half, rng.uniform(-0.05, 0.3))
    for p in others:
        rel = _exceedance(values, p)
        if (
            rel is not None
            and not set(SIGNALS[p]) <= frozen
            and (target == NO_PATHOLOGY or rel >= 0.75 * top)
        ):
            _below(rng, values, p)
    if rng.random() < P_DISTRACTOR:
        free = [f for f in THRESHOLDS if f not in frozen and values[f] <= THRESHOLDS[f]]
        if free:
            f = rng.choice(free)
            _set_rel(values, f, 0.0 if rng.random() < P_EXACT else -rng.uniform(0.0, 0.0999))
    return _round(values)


def _context(rng: random.Random, values: dict[str, Any]) -> dict[str, Any]:
    """Optional runner context (age, sexe, km_semaine): present in ~70% of records."""
    if rng.random() < 0.3:
        return values
    sexe = rng.choice(["F", "H"])
    return values | {"age": rng.randint(18, 70), "sexe": sexe, "km_semaine": rng.choice(range(5, 95, 5))}


def generate_inputs(n: int, seed: int, hard_share: float | None = None) -> list[dict[str, Any]]:
    """n measurement records, exactly balanced over the 7 labels (largest remainder), shuffled.

    `hard_share` replaces P_MULTI, the chance that a case with a pathology gets a second, weaker firing
    signal to tell apart from the decisive one (the cases a small model gets wrong)."""
    p_multi = P_MULTI if hard_share is None else hard_share
    rng = random.Random(seed)
    quotas = label_quotas(n, dict.fromkeys(LABELS, 1.0))
    targets = [label for label in LABELS for _ in range(quotas[label])]
    rng.shuffle(targets)
    records = []
    for target in targets:
        for _ in range(1000):
            values = _draw(rng, target, p_multi)
            if diagnose(values).pathologie == target:
                break
        else:  # pragma: no cover - the construction above hits its target in a few draws
            raise RuntimeError(f"aria generator could not reach label {target!r}")
        records.append(_context(rng, values))
    return records


def answer_json(answer: dict[str, str]) -> str:
    """The compact JSON text the model learns (key order pathologie, confiance, justification)."""
    keys = ("pathologie", "confiance", "justification")
    return json.dumps({k: answer[k] for k in keys}, ensure_ascii=False)


def corrupt_answer(record: dict[str, Any], kind: str, rng: random.Random) -> str:
    """A plausible but wrong answer for DPO `rejected` (see REJECTION_KINDS)."""
    d = diagnose(record)
    good = d.answer()
    if kind == "wrong_pathology":
        # Hard negative: the pathology whose signal comes closest, cited as if it decided.
        candidates = [p for p in LABELS if p != d.pathologie]
        wrong = min(candidates, key=lambda p: _distance(record, p))
        why = (
            " et ".join(f"{f} {fmt(f, record[f])} > {fmt_threshold(f)}" for f in SIGNALS[wrong])
            if wrong != NO_PATHOLOGY
            else "aucun seuil dépassé"
        )
        return answer_json(good | {"pathologie": wrong, "justification": why})
    if kind == "wrong_confidence":
        return answer_json(good | {"confiance": rng.choice([c for c in CONFIDENCES if c != d.confiance])})
    if kind == "wrong_signal":
        field = rng.choice([f for f in THRESHOLDS if f not in SIGNALS.get(d.pathologie, {})])
        op = ">" if record[field] > THRESHOLDS[field] else "≤"
        return answer_json(
            good | {"justification": f"{field} {fmt(field, record[field])} {op} {fmt_threshold(field)}"}
        )
    if kind == "invalid_json":
        text = answer_json(good)
        return rng.choice(
            [
                text[: len(text) // 2],  # truncated
                "Diagnostic: " + text,  # prose before the JSON
                text.replace('"', "'"),  # single quotes
                json.dumps({"pathologie": d.pathologie}, ensure_ascii=False),  # missing keys
            ]
        )
    raise ValueError(f"unknown rejection kind {kind!r}")


def _distance(record: dict[str, Any], pathology: str) -> float:
    if pathology == NO_PATHOLOGY:
        return 1.0
    return max((thr - record[f]) / thr for f, thr in SIGNALS[pathology].items())


REPORT_ADVICE = {
    "Lombalgie mécanique": "gainage du tronc; redresser le buste en course",
    "Syndrome fémoro-patellaire (SFP)": "renforcer moyen fessier et quadriceps; contrôler l'axe du genou",
    "Syndrome bandelette ilio-tibiale (SBIT)": "renforcer les abducteurs de hanche; limiter les descentes",
    "Périostite tibiale": "raccourcir la foulée (+5 à 10% de cadence); progressivité du volume",
    "Fasciite plantaire": "étirer le fascia et le mollet; chaussure plus stable",
    "Tendinite Achille": "renforcement excentrique du mollet; attaque moins talon",
    NO_PATHOLOGY: "entretien: renforcement général et progressivité",
}


def report_text(record: dict[str, Any]) -> str:
    """The short structured French report the second ARIA call produces for a record."""
    d = diagnose(record)
    others = [p for p in d.exceedances if p != d.pathologie]
    lines = [
        "Rapport biomécanique",
        f"Diagnostic: {d.pathologie} (confiance {d.confiance}).",
        f"Signal: {d.justification}.",
        "Autres signaux: " + (", ".join(others) if others else "aucun") + ".",
        f"Conseils: {REPORT_ADVICE[d.pathologie]}.",
    ]
    km = record.get("km_semaine")
    if km is not None and km > 40 and d.pathologie != NO_PATHOLOGY:
        lines.append(f"Volume: réduire de 20% ({km:g} km/semaine actuellement).")
    lines.append("Suivi: nouvelle analyse dans 4 semaines.")
    return "\n".join(lines)
