"""ARIA diagnosis rules: the input fields, the thresholds and the reference labeller.

    record = validate_input({"inclinaison_tronc": 8.4, ...})   # DataError names the bad field
    d = diagnose(record)   # Diagnosis(pathologie="Lombalgie mécanique", confiance="modérée", ...)

The rules (MISSION.md section 1), documented here once:

- A signal fires when its value is strictly greater than its threshold (x > seuil); a value equal to
  the threshold does not fire. Tendinite Achille needs both heel_strike_index > 0.7 and
  dorsiflexion_max > 15; either half alone is not enough.
- Relative exceedance of a signal = (value - seuil) / seuil. For Achille it is the smaller of its two
  relative exceedances (the weaker half decides how clearly both hold).
- Several signals firing: the primary pathology is the one with the largest relative exceedance; an
  exact tie goes to the earlier row of the table below (its order is MISSION.md's).
- No signal firing: the label is NO_PATHOLOGY = "Aucune pathologie".
- confiance follows the decisive margin: for a pathology its relative exceedance, for
  "Aucune pathologie" the relative distance of the closest signal below its threshold
  ((seuil - value) / seuil; for Achille the larger distance of its two halves, since both must rise).
  margin >= 0.25 -> "élevée", >= 0.10 -> "modérée", otherwise "faible".
  Margins are rounded to 1e-9 so that decimal inputs such as 7.7 vs 7 land on the documented side.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from medtune.errors import DataError

NO_PATHOLOGY = "Aucune pathologie"
CONFIDENCES = ["élevée", "modérée", "faible"]
HIGH_MARGIN = 0.25
MODERATE_MARGIN = 0.10


@dataclass(frozen=True)
class Field:
    name: str
    unit: str  # shown after the value: "°", " m" or ""
    decimals: int  # display precision (the generator rounds to it)
    low: float  # plausible range; outside it the record is rejected
    high: float


FIELDS: dict[str, Field] = {
    f.name: f
    for f in [
        Field("inclinaison_tronc", "°", 1, -15.0, 45.0),
        Field("valgus_genou", "°", 1, -20.0, 40.0),
        Field("adduction_hanche", "°", 1, -20.0, 40.0),
        Field("longueur_foulée", " m", 2, 0.3, 3.0),
        Field("pronation_pied", "°", 1, -20.0, 30.0),
        Field("heel_strike_index", "", 2, 0.0, 1.0),
        Field("dorsiflexion_max", "°", 1, -15.0, 50.0),
    ]
}
ALIASES = {"longueur_foulee": "longueur_foulée"}
CONTEXT_RANGES = {"age": (5.0, 110.0), "km_semaine": (0.0, 400.0)}
SEXES = {"f": "F", "femme": "F", "h": "H", "m": "H", "homme": "H"}

# pathology -> the fields (and their thresholds) that must all exceed; order = MISSION.md table order.
SIGNALS: dict[str, dict[str, float]] = {
    "Lombalgie mécanique": {"inclinaison_tronc": 7.0},
    "Syndrome fémoro-patellaire (SFP)": {"valgus_genou": 10.0},
    "Syndrome bandelette ilio-tibiale (SBIT)": {"adduction_hanche": 10.0},
    "Périostite tibiale": {"longueur_foulée": 1.35},
    "Fasciite plantaire": {"pronation_pied": 6.0},
    "Tendinite Achille": {"heel_strike_index": 0.7, "dorsiflexion_max": 15.0},
}
PATHOLOGIES = list(SIGNALS)
LABELS = [*PATHOLOGIES, NO_PATHOLOGY]
THRESHOLDS = {f: thr for sig in SIGNALS.values() for f, thr in sig.items()}


def fmt(field: str, value: float) -> str:
    """A value as the prompt and the justification show it: the field's precision, more if needed."""
    spec = FIELDS[field]
    text = f"{value:.{spec.decimals}f}"
    if float(text) != value:  # never hide a digit that decides a threshold (7.04 must not read 7.0)
        text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text + spec.unit


def fmt_threshold(field: str) -> str:
    thr = THRESHOLDS[field]
    return f"{thr:g}{FIELDS[field].unit}"


def relative_gap(field: str, value: float) -> str:
    """Signed gap to the threshold in percent, e.g. "+2.0%"; never shows 0.0 for a value that fires."""
    thr = THRESHOLDS[field]
    pct = (value - thr) / thr * 100
    text = f"{pct:+.1f}%"
    if value != thr and text in ("+0.0%", "-0.0%"):
        text = f"{pct:+.3f}%"
    elif value == thr:
        text = "0.0%"
    return text


def _number(record: dict[str, Any], key: str, where: str) -> float:
    value = record[key]
    if isinstance(value, bool):
        raise DataError(f"{where}field {key!r}: expected a number, found {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip().replace(",", "."))
        except ValueError:
            raise DataError(f"{where}field {key!r}: expected a number, found {record[key]!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}field {key!r}: expected a finite number, found {record[key]!r}")
    return float(value)


def validate_input(record: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The normalised measurement record (canonical keys, floats); DataError names the bad field.

    `where` (e.g. "data.jsonl:12: ") prefixes every message. Unknown keys are ignored.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where}expected an object with the ARIA measurements, found {type(record).__name__}"
        )
    record = {ALIASES.get(k, k): v for k, v in record.items()}
    out: dict[str, Any] = {}
    for name, spec in FIELDS.items():
        if name not in record or record[name] is None:
            close = difflib.get_close_matches(name, [k for k in record if k not in FIELDS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}field {name!r} is missing{hint}")
        value = _number(record, name, where)
        if not spec.low <= value <= spec.high:
            raise DataError(
                f"{where}field {name!r}: {value:g} is outside the plausible range [{spec.low:g}, {spec.high:g}]"
            )
        out[name] = value
    for key, (low, high) in CONTEXT_RANGES.items():
        if record.get(key) is not None:
            value = _number(record, key, where)
            if not low <= value <= high:
                raise DataError(
                    f"{where}field {key!r}: {value:g} is outside the plausible range [{low:g}, {high:g}]"
                )
            out[key] = int(value) if value.is_integer() else value
    if record.get("sexe") is not None:
        sexe = SEXES.get(str(record["sexe"]).strip().casefold())
        if sexe is None:
            raise DataError(f"{where}field 'sexe': expected F or H (femme/homme), found {record['sexe']!r}")
        out["sexe"] = sexe
    return out


@dataclass(frozen=True)
class Diagnosis:
    pathologie: str
    confiance: str
    justification: str
    margin: float  # the decisive relative margin (exceedance, or distance below for no pathology)
    exceedances: dict[str, float]  # every firing pathology -> its relative exceedance

    def answer(self) -> dict[str, str]:
        return {
            "pathologie": self.pathologie,
            "confiance": self.confiance,
            "justification": self.justification,
        }


def _rel(value: float, thr: float) -> float:
    return round((value - thr) / thr, 9)


def confidence_for(margin: float) -> str:
    if margin >= HIGH_MARGIN:
        return "élevée"
    if margin >= MODERATE_MARGIN:
        return "modérée"
    return "faible"


def _cite(record: dict[str, Any], field: str, op: str) -> str:
    return f"{field} {fmt(field, record[field])} {op} {fmt_threshold(field)}"


def diagnose(record: dict[str, Any]) -> Diagnosis:
    """Apply the rules to a validated record (see the module docstring)."""
    exceed: dict[str, float] = {}
    for pathology, signal in SIGNALS.items():
        if all(record[f] > thr for f, thr in signal.items()):
            exceed[pathology] = min(_rel(record[f], thr) for f, thr in signal.items())
    if exceed:
        # max() keeps the first of equal values, i.e. the table order breaks exact ties.
        primary = max(exceed, key=lambda p: exceed[p])
        margin = exceed[primary]
        why = " et ".join(_cite(record, f, ">") for f in SIGNALS[primary])
        return Diagnosis(primary, confidence_for(margin), why, margin, exceed)
    # No pathology: how far is the closest one from firing? For each pathology the field that is
    # furthest below (all its fields must rise), then the pathology that needs the least.
    gaps = []
    for signal in SIGNALS.values():
        gap, field = max((-_rel(record[f], thr), f) for f, thr in signal.items())
        gaps.append((gap, field))
    margin, field = min(gaps, key=lambda g: g[0])
    why = f"aucun seuil dépassé; le plus proche: {_cite(record, field, '≤')}"
    return Diagnosis(NO_PATHOLOGY, confidence_for(margin), why, margin, {})
