"""Headache triage rules (MISSION.md section 4): a French clinical-case analyser and the reference answers.

    a = analyse("patiente 34 ans, céphalées brutales, pas de fièvre")
    a.red_flags == ["début brutal"]; a.absent == {"fièvre"}; a.label == "red_flag"
    reference(a)  # "Recommandation: IRM cérébrale en urgence (signes d'alerte: début brutal) — ..."

How a case is read (accent- and case-insensitive, on `fold_text`):

- The text is cut into clauses at `. ; , ! newline` and at "mais". A finding is *absent* when a
  negation cue precedes it in its clause (`pas de`, `pas d'`, `sans`, `absence de`, `aucun(e)`, `ni`,
  `non`, `n'est pas`, `ne ... pas`, `nie`) or the clause ends with `: non` / `absent(e)` / `nié(e)`; so
  "pas de fièvre ni vomissements" negates both and "pas de fièvre, déficit moteur" keeps the deficit.
  Some words mean absence by themselves (apyrétique, examen neurologique normal).
- A finding is *possible* when its clause carries a hedge (possible, probable, suspicion, peut-être,
  sensation de, non mesurée, douteux, à confirmer, "?"); otherwise it is *present*.
- Red flags: focal deficit, fever, thunderclap/sudden onset, neck stiffness, seizure, loss of
  consciousness, pregnancy/post-partum, cancer, immunosuppression, recent head trauma, and age > 50
  with a headache whose onset is described and is not chronic/habitual.
- Key facts (the three standard questions): Q1 onset and character is known when the onset or
  character is described; Q2 is known when both fever and focal deficit are addressed (present,
  absent or possible); Q3 is known when any history item is addressed (pregnancy, antécédents,
  cancer, immunosuppression, head trauma).

Labels and reference answers:

- "red_flag": a red flag is present -> `Recommandation:` urgent brain MRI, the flags, the suspected
  cause of the first flag, the source. A red flag wins even when key facts are missing.
- "ambiguous": no red flag is present but one is *possible* (hedged). Reference: the urgent
  recommendation too, naming the flag as possible and to confirm; a missed subarachnoid haemorrhage
  costs far more than an MRI, so doubt is treated as a red flag.
- "clarify": no red flag present or possible, a key fact missing -> `Pour préciser:` and exactly
  the three standard questions, always all three, in order.
- "no_red_flag": all key facts known, no red flag -> `Recommandation:` no urgent imaging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medtune.tasks.base import fold_text

CLARIFY, RED_FLAG, NO_RED_FLAG, AMBIGUOUS = "clarify", "red_flag", "no_red_flag", "ambiguous"
LABELS = [CLARIFY, RED_FLAG, NO_RED_FLAG, AMBIGUOUS]
PREFIXES = ("Pour préciser:", "Recommandation:")
SOURCE = "Source: HAS/SFETD 2017."
QUESTIONS = [
    "Depuis quand et quel est le caractère des céphalées (brutal, intense, progressif) ?",
    "Y a-t-il fièvre, vomissements, perte de connaissance, convulsions ou déficit neurologique focal ?",
    "Grossesse ou post-partum, antécédents majeurs (cancer, immunodépression) ou traumatisme crânien récent ?",
]
CLARIFY_ANSWER = "Pour préciser: " + " | ".join(QUESTIONS)
NON_URGENT_ANSWER = (
    "Recommandation: pas d'imagerie en urgence (aucun signe d'alerte) — traitement symptomatique, "
    "IRM si aggravation. " + SOURCE
)


@dataclass(frozen=True)
class Concept:
    name: str  # French display name used in answers
    patterns: tuple[str, ...]  # regexes on folded text
    absent_words: tuple[str, ...] = ()  # phrases that by themselves mean "absent"
    suspicion: str = ""  # the cause an urgent MRI looks for, with its preposition (red flags only)


# Red flags in priority order: the first present one names the suspected cause.
RED_FLAGS = [
    Concept(
        "début brutal",
        (r"brutal\w*", r"brutaux", r"coup de tonnerre", r"soudain\w*"),
        (),
        "d'hémorragie méningée",
    ),
    Concept(
        "raideur de nuque",
        (r"raideur (de (la )?)?nuque", r"nuque raide", r"syndrome mening\w*"),
        (),
        "de méningite",
    ),
    Concept(
        "fièvre",
        (r"fievre\w*", r"febrile", r"febricule", r"hyperthermie"),
        (r"apyretique", r"afebrile"),
        "de méningite ou d'encéphalite",
    ),
    Concept(
        "déficit neurologique focal",
        (r"deficit\w*", r"hemipar\w*", r"hemipleg\w*", r"aphasi\w*", r"paralysie\w*"),
        (r"examen neurologique (normal|sans particularite)",),
        "de lésion structurelle (AVC, tumeur)",
    ),
    Concept(
        "crise convulsive",
        (r"convuls\w*", r"crises? (d'epilepsie|epileptique|comitiale)\w*"),
        (),
        "de lésion structurelle",
    ),
    Concept(
        "perte de connaissance",
        (r"perte de connaissance", r"syncope", r"troubles? de (la )?conscience"),
        (),
        "d'hémorragie intracrânienne",
    ),
    Concept(
        "traumatisme crânien",
        (r"trauma\w* crani\w*", r"chute sur la tete", r"choc (a|sur) la tete"),
        (),
        "d'hématome intracrânien",
    ),
    Concept(
        "grossesse/post-partum",
        (r"enceinte", r"grossesse", r"post-?partum"),
        (),
        "de thrombose veineuse cérébrale",
    ),
    Concept(
        "cancer", (r"cancer\w*", r"neoplasi\w*", r"tumeur\w*", r"metasta\w*"), (), "de métastase cérébrale"
    ),
    Concept(
        "immunodépression",
        (r"immunodepr\w*", r"immunosuppr\w*", r"\bvih\b", r"chimiotherapie"),
        (),
        "d'infection opportuniste",
    ),
]
AGE_FLAG = Concept("céphalée récente après 50 ans", (), (), "d'artérite temporale ou de tumeur")
VOMITING = Concept("vomissements", (r"vomi\w*", r"nausees? et vomissements"))
HISTORY_WORDS = (r"antecedent\w*", r"\batcd\b")
ONSET_WORDS = (
    r"depuis",
    r"progressi\w*",
    r"pulsatil\w*",
    r"en casque",
    r"en etau",
    r"intense\w*",
    r"habituel\w*",
    r"chronique\w*",
    r"d'installation",
    r"brutal\w*",
    r"brutaux",
    r"soudain\w*",
    r"coup de tonnerre",
)
CHRONIC_WORDS = (
    r"habituel\w*",
    r"chronique\w*",
    r"connue?s? depuis",
    r"depuis des annees",
    r"migraine\w* connue\w*",
)
_NEG_BEFORE = re.compile(
    r"\b(pas d[e']|pas d'|sans|absence d[e']|aucune?|ni|non|n'est pas|n'a pas|ne \w+ pas|nie|jamais)(\b|\s|')"
)
_NEG_AFTER = re.compile(r"(:\s*non|\bnon|\babsente?s?|\bniee?s?|\bnegati\w*)\s*$")
_HEDGE = re.compile(
    r"(\bpossibles?\b|\bprobables?\b|suspicion|peut-etre|sensation de|non mesuree?s?|douteu\w*|a confirmer|\?|eventuel\w*)"
)
_CLAUSES = re.compile(r"[.;,!\n]|\bmais\b")
_AGE = re.compile(r"(?<!depuis )(?<!il y a )\b(\d{1,3}) ?ans\b")


@dataclass
class Analysis:
    """What the rules read in a case: each red flag's status, the key facts, the label."""

    status: dict[str, str] = field(default_factory=dict)  # concept -> present / possible / absent
    age: int | None = None
    known: dict[str, bool] = field(default_factory=dict)  # q1 / q2 / q3 -> addressed in the case

    @property
    def red_flags(self) -> list[str]:
        return [c.name for c in [*RED_FLAGS, AGE_FLAG] if self.status.get(c.name) == "present"]

    @property
    def possible_flags(self) -> list[str]:
        return [c.name for c in RED_FLAGS if self.status.get(c.name) == "possible"]

    @property
    def absent(self) -> set[str]:
        return {name for name, s in self.status.items() if s == "absent"}

    @property
    def missing(self) -> list[str]:
        return [q for q, ok in self.known.items() if not ok]

    @property
    def label(self) -> str:
        if self.red_flags:
            return RED_FLAG
        if self.possible_flags:
            return AMBIGUOUS
        return CLARIFY if self.missing else NO_RED_FLAG


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSES.split(fold_text(text.replace("\n", " . "))) if c.strip()]


def find_status(text: str, patterns: tuple[str, ...], absent_words: tuple[str, ...] = ()) -> str | None:
    """present / possible / absent / None (not mentioned) for a finding described by `patterns`.

    Over several mentions a certain "present" wins over "possible", which wins over "absent".
    """
    found: set[str] = set()
    for clause in _clauses(text):
        if any(re.search(p, clause) for p in absent_words):
            found.add("absent")
        for p in patterns:
            for m in re.finditer(p, clause):
                if _NEG_BEFORE.search(clause[: m.start()]) or _NEG_AFTER.search(clause[m.end() :]):
                    found.add("absent")
                elif _HEDGE.search(clause):
                    found.add("possible")
                else:
                    found.add("present")
    for status in ("present", "possible", "absent"):
        if status in found:
            return status
    return None


def _mentions(text: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, c) for c in _clauses(text) for p in patterns)


def analyse(text: str) -> Analysis:
    """Read a French headache case (see the module docstring for the rules)."""
    a = Analysis()
    for concept in RED_FLAGS:
        status = find_status(text, concept.patterns, concept.absent_words)
        if status:
            a.status[concept.name] = status
    vomiting = find_status(text, VOMITING.patterns)
    if vomiting:
        a.status[VOMITING.name] = vomiting
    m = _AGE.search(fold_text(text))
    a.age = int(m.group(1)) if m else None
    onset_known = _mentions(text, ONSET_WORDS)
    if a.age is not None and a.age > 50 and onset_known and not _mentions(text, CHRONIC_WORDS):
        a.status[AGE_FLAG.name] = "present"
    history = ["traumatisme crânien", "grossesse/post-partum", "cancer", "immunodépression"]
    a.known = {
        "q1": onset_known,
        "q2": "fièvre" in a.status and "déficit neurologique focal" in a.status,
        "q3": any(h in a.status for h in history) or _mentions(text, HISTORY_WORDS),
    }
    return a


def reference(a: Analysis) -> str:
    """The templated reference answer for an analysis."""
    if a.label == CLARIFY:
        return CLARIFY_ANSWER
    if a.label == NO_RED_FLAG:
        return NON_URGENT_ANSWER
    by_name = {c.name: c for c in [*RED_FLAGS, AGE_FLAG]}
    if a.label == RED_FLAG:
        flags = a.red_flags
        why = f"signes d'alerte: {', '.join(flags)}"
    else:
        flags = a.possible_flags
        why = f"signe d'alerte possible, à confirmer: {', '.join(flags)}"
    return f"Recommandation: IRM cérébrale en urgence ({why}) — suspicion {by_name[flags[0]].suspicion}. {SOURCE}"
