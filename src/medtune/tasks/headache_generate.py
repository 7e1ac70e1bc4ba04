"""Seeded synthetic French headache cases and DPO corruptions for the headache task pack.

    cases = generate_cases(500, seed=1)        # [{"case": "patiente 34 ans, céphalées ..."}, ...]
    rejected = corrupt_answer(case_text, "wrong_decision", rng)

Each case is built for a target label (quotas ~40% clarify, ~30% red_flag, ~20% no_red_flag, ~10%
ambiguous), then re-read by the rules (`headache_rules.analyse`); a draw the rules read otherwise is
redrawn, so the stored label is always the rules' label. Augmentation (seed 003): patient/patiente,
céphalées/maux de tête, two sentence shapes, shuffled order of facts, several negation forms (pas de,
absence de, sans, aucun, ": non", ni-chains, apyrétique, examen neurologique normal) and hedges.
"""

from __future__ import annotations

import random
from typing import Any

from medtune.tasks.base import label_quotas
from medtune.tasks.headache_rules import (
    AMBIGUOUS,
    CLARIFY,
    CLARIFY_ANSWER,
    NO_RED_FLAG,
    NON_URGENT_ANSWER,
    QUESTIONS,
    RED_FLAG,
    SOURCE,
    analyse,
    reference,
)

WEIGHTS = {CLARIFY: 0.4, RED_FLAG: 0.3, NO_RED_FLAG: 0.2, AMBIGUOUS: 0.1}
REJECTION_KINDS = ["wrong_decision", "bad_format", "bad_questions"]

# headache word -> feminine?; adjectives as (feminine plural, masculine plural)
WORDS = {"céphalées": True, "maux de tête": False}
ADJ = {
    "progressif": ("progressives", "progressifs"),
    "pulsatile": ("pulsatiles", "pulsatiles"),
    "intense": ("intenses", "intenses"),
    "brutal": ("brutales", "brutaux"),
    "habituel": ("habituelles", "habituels"),
    "connu": ("connues", "connus"),
}
DURATIONS = [
    "hier",
    "ce matin",
    "2 jours",
    "3 jours",
    "5 jours",
    "1 semaine",
    "2 semaines",
    "3 semaines",
    "1 mois",
]

# finding -> (positive phrasings, negatable noun, extra negative phrasings, hedged phrasings)
SIGNS = {
    "fièvre": (
        ["fièvre à 39°C", "fièvre", "fébrile"],
        "fièvre",
        ["apyrétique"],
        ["fièvre non mesurée", "sensation de fièvre", "possible fièvre", "fièvre ?"],
    ),
    "déficit": (
        ["déficit moteur du bras droit", "déficit neurologique focal", "hémiparésie gauche", "aphasie"],
        "déficit neurologique",
        ["aucun déficit", "examen neurologique normal"],
        ["possible déficit moteur", "déficit moteur douteux", "suspicion de déficit sensitif"],
    ),
    "raideur": (
        ["raideur de nuque", "nuque raide"],
        "raideur de nuque",
        [],
        ["raideur de nuque douteuse", "possible raideur de nuque"],
    ),
    "convulsion": (
        ["crise convulsive", "convulsions"],
        "convulsions",
        [],
        ["possible crise convulsive", "convulsions ?"],
    ),
    "pc": (
        ["perte de connaissance", "syncope"],
        "perte de connaissance",
        [],
        ["possible perte de connaissance", "perte de connaissance ?"],
    ),
    "vomissements": (["vomissements", "nausées et vomissements"], "vomissements", [], []),
    "trauma": (
        ["traumatisme crânien hier", "chute sur la tête la veille"],
        "traumatisme crânien",
        ["sans traumatisme crânien récent"],
        ["possible traumatisme crânien", "chute sur la tête à confirmer"],
    ),
    "cancer": (
        ["antécédent de cancer du poumon", "néoplasie colique en cours de traitement"],
        "cancer",
        ["sans antécédent de cancer"],
        [],
    ),
    "immuno": (["VIH", "sous chimiothérapie", "immunodépression connue"], "immunodépression", [], []),
}
RED_SIGNS = ["fièvre", "déficit", "raideur", "convulsion", "pc", "trauma", "cancer", "immuno"]
BENIGN_HISTORY = ["sans antécédent notable", "pas d'antécédent", "antécédent de migraine", "ATCD: asthme"]


def _adj(key: str, feminine: bool) -> str:
    return ADJ[key][0 if feminine else 1]


def _negated(rng: random.Random, sign: str) -> str:
    _, noun, extra, _ = SIGNS[sign]
    forms = [f"pas de {noun}", f"absence de {noun}", f"sans {noun}", f"{noun}: non", *extra]
    return rng.choice(forms)


def _phrase(rng: random.Random, sign: str, status: str) -> str:
    positive, _, _, hedged = SIGNS[sign]
    if status == "present":
        return rng.choice(positive)
    if status == "possible":
        return rng.choice(hedged)
    return _negated(rng, sign)


def _onset(rng: random.Random, fem: bool, kind: str) -> str:
    """The words after the headache noun: new, chronic, thunderclap or hedged-thunderclap onset."""
    d = rng.choice(DURATIONS)
    since = f"depuis {d}"
    if kind == "new":
        return rng.choice(
            [
                f"{_adj('progressif', fem)} {since}",
                f"{_adj('pulsatile', fem)} {since}",
                f"en casque {since}",
                f"{_adj('intense', fem)} {since}",
                since,
            ]
        )
    if kind == "chronic":
        return rng.choice(
            [
                f"{_adj('habituel', fem)}, {_adj('connu', fem)} depuis des années",
                "chroniques depuis des années",
            ]
        )
    if kind == "thunderclap":
        return rng.choice(
            [_adj("brutal", fem), f"{_adj('brutal', fem)} en coup de tonnerre", "en coup de tonnerre"]
        )
    return rng.choice(["de début peut-être brutal", "de début brutal ?"])  # hedged


def _signs_clauses(rng: random.Random, statuses: dict[str, str]) -> list[str]:
    """Clauses for sign statuses; several negated signs sometimes share one `ni` chain."""
    negated = [s for s, st in statuses.items() if st == "absent" and SIGNS[s][1]]
    clauses = []
    if len(negated) >= 2 and rng.random() < 0.4:
        nouns = [SIGNS[s][1] for s in negated]
        clauses.append(rng.choice(["pas de ", "sans "]) + " ni ".join(nouns))
        statuses = {s: st for s, st in statuses.items() if s not in negated}
    clauses += [_phrase(rng, s, st) for s, st in statuses.items()]
    return clauses


def _draw(rng: random.Random, target: str) -> str:
    fem_patient = rng.random() < 0.5
    age = rng.randint(18, 80)
    word = rng.choice(list(WORDS))
    fem = WORDS[word]
    statuses: dict[str, str] = {}
    onset_kind: str | None = "new" if age <= 50 or rng.random() < 0.2 else "chronic"
    known = {"q1", "q2", "q3"}
    if target == CLARIFY:
        missing = set(rng.sample(sorted(known), rng.randint(1, 3))) if rng.random() > 0.3 else set(known)
        known -= missing
        if "q1" not in known:
            onset_kind = None
        elif age > 50:
            onset_kind = "chronic"
        if "q2" not in known and rng.random() < 0.4:  # half-answered signs still miss a key fact
            statuses[rng.choice(["fièvre", "déficit"])] = "absent"
    elif target == RED_FLAG:
        flags = rng.sample([*RED_SIGNS, "onset", "onset", "age", "pregnancy"], rng.choice([1, 1, 2]))
        for f in flags:
            if f == "onset":
                onset_kind = "thunderclap"
            elif f == "age":
                age, onset_kind = rng.randint(51, 85), "new"
                known.add("q1")
            elif f == "pregnancy":
                fem_patient, age = True, rng.randint(18, 42)
                statuses["pregnancy"] = "present"
            else:
                statuses[f] = "present"
        known = {q for q in sorted(known) if (q == "q1" and "age" in flags) or rng.random() < 0.6}
    elif target == AMBIGUOUS:
        hedged = rng.choice([*sorted(SIGNS.keys() - {"vomissements", "cancer", "immuno"}), "onset"])
        if hedged == "onset":
            onset_kind = "hedged"
        else:
            statuses[hedged] = "possible"
        known = {q for q in sorted(known) if rng.random() < 0.7}
    elif age > 50:
        onset_kind = "chronic"
    # Fill the known key facts with benign or negated statements.
    if "q1" not in known and onset_kind in ("new", "chronic"):
        onset_kind = None
    if "q2" in known:
        for s in ("fièvre", "déficit"):
            statuses.setdefault(s, "absent")
        for s in ("vomissements", "pc", "convulsion", "raideur"):
            if s not in statuses and rng.random() < 0.3:
                statuses[s] = "present" if s == "vomissements" and rng.random() < 0.5 else "absent"
    history: list[str] = []
    if "q3" in known:
        if not {"trauma", "cancer", "immuno", "pregnancy"} & statuses.keys():
            history.append(rng.choice(BENIGN_HISTORY))  # "no history" would contradict a listed one
        for s in ("trauma", "cancer"):
            if s not in statuses and rng.random() < 0.3:
                statuses[s] = "absent"
        if fem_patient and age <= 45 and "pregnancy" not in statuses and rng.random() < 0.6:
            history.append(
                rng.choice(["elle n'est pas enceinte", "pas de grossesse en cours", "grossesse: non"])
            )
    pregnancy = statuses.pop("pregnancy", None)
    if pregnancy:
        history.append(rng.choice([f"enceinte de {rng.randint(8, 36)} semaines", "en post-partum"]))
    facts = _signs_clauses(rng, statuses) + history
    rng.shuffle(facts)
    subject = rng.choice(["patiente", "femme"] if fem_patient else ["patient", "homme"])
    headache = word + (f" {_onset(rng, fem, onset_kind)}" if onset_kind else "")
    if rng.random() < 0.7:
        head = f"{subject} {age} ans, {headache}"
    else:
        article = "une" if fem_patient else "un"
        head = f"{headache[0].upper()}{headache[1:]} chez {article} {subject} de {age} ans"
    return ", ".join([head, *facts])


def generate_cases(n: int, seed: int) -> list[dict[str, Any]]:
    """n case records {"case": text}, label quotas from WEIGHTS, shuffled, deterministic for a seed."""
    rng = random.Random(seed)
    quotas = label_quotas(n, WEIGHTS)
    targets = [label for label in WEIGHTS for _ in range(quotas[label])]
    rng.shuffle(targets)
    out = []
    for target in targets:
        for _ in range(1000):
            text = _draw(rng, target)
            if analyse(text).label == target:
                break
        else:  # pragma: no cover - the construction reaches its target in a few draws
            raise RuntimeError(f"headache generator could not reach label {target!r}")
        out.append({"case": text})
    return out


def corrupt_answer(text: str, kind: str, rng: random.Random) -> str:
    """A wrong answer for DPO `rejected`: wrong decision, broken format, or wrong questions."""
    a = analyse(text)
    good = reference(a)
    if kind == "wrong_decision":
        if a.label in (RED_FLAG, AMBIGUOUS):
            return NON_URGENT_ANSWER  # missed red flag
        if a.label == CLARIFY:
            return rng.choice([NON_URGENT_ANSWER, _urgent_for_negated(a)])  # concludes without the facts
        return _urgent_for_negated(a)  # reads a negated sign as present
    if kind == "bad_format":
        body = good.split(":", 1)[1].strip()
        return rng.choice([body[0].upper() + body[1:], "Réponse: " + body, "D'après le cas, " + body])
    if kind == "bad_questions":
        if a.label == CLARIFY:
            # Too few questions, or a fourth off-protocol one.
            return rng.choice(
                [
                    "Pour préciser: " + " | ".join(QUESTIONS[:2]),
                    CLARIFY_ANSWER + " | Quel traitement a été pris ?",
                ]
            )
        return CLARIFY_ANSWER  # asks questions instead of deciding
    raise ValueError(f"unknown rejection kind {kind!r}")


def _urgent_for_negated(a: Any) -> str:
    sign = sorted(a.absent)[0] if a.absent else "fièvre"
    return (
        f"Recommandation: IRM cérébrale en urgence (signes d'alerte: {sign}) — suspicion de lésion. {SOURCE}"
    )
