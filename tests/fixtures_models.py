"""Tiny-model fixtures (owned by the training area): built in-process in seconds, nothing downloaded.

- `tiny_model_dir`: a saved embedded model (size tiny, chatml template, SentencePiece tokenizer with
  <|im_start|>/<|im_end|> as single tokens, <|im_end|> = eos), shared by the whole session. Read-only:
  copy it (`shutil.copytree`) before changing anything in it.
- `tiny_model_factory(name, **config)`: builds another tiny model (other sizes, seeds or texts).
- `tiny_sft_model_dir`: the tiny model after a short full SFT on aria-like records (its output layer is
  trained, unlike a random init's, so small updates such as LoRA visibly move its predictions).
- `tiny_sliding_window_model_dir`: the tiny model's weights as a Mistral with an 8-token sliding
  window (caches with sliding-window layers, as Gemma's and Mistral's).
- `tiny_chat_records(n, seed)` / `tiny_preference_records(n, seed)`: aria-like canonical records.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "tiny_chat_records",
    "tiny_corpus",
    "tiny_gqa_model_dir",
    "tiny_model_dir",
    "tiny_model_factory",
    "tiny_preference_records",
    "tiny_sft_model_dir",
    "tiny_sliding_window_model_dir",
]

SYSTEM = "Tu es ARIA, assistant d'analyse biomécanique de la course. Réponds en JSON."
# (pathology, signal name, threshold): the aria rule table, simplified to one signal each.
RULES = [
    ("Lombalgie mécanique", "inclinaison_tronc", 7.0),
    ("Syndrome fémoro-patellaire (SFP)", "valgus_genou", 10.0),
    ("Syndrome bandelette ilio-tibiale (SBIT)", "adduction_hanche", 10.0),
    ("Périostite tibiale", "longueur_foulée", 1.35),
    ("Fasciite plantaire", "pronation_pied", 6.0),
]
CONFIDENCE = ["élevée", "modérée", "faible"]


def _case(rng: random.Random) -> tuple[str, str]:
    """(user prompt, JSON answer) for one random case; the pathology is the signal above threshold."""
    k = rng.randrange(len(RULES))
    values = {}
    for i, (_, signal, threshold) in enumerate(RULES):
        factor = rng.uniform(1.1, 1.6) if i == k else rng.uniform(0.3, 0.9)
        values[signal] = round(threshold * factor, 2)
    prompt = "Mesures du coureur : " + ", ".join(f"{s} = {v}" for s, v in values.items()) + ". Diagnostic ?"
    pathology, signal, threshold = RULES[k]
    answer = json.dumps(
        {
            "pathologie": pathology,
            "confiance": rng.choice(CONFIDENCE),
            "justification": f"{signal} = {values[signal]} > {threshold}",
        },
        ensure_ascii=False,
    )
    return prompt, answer


def tiny_chat_records(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """n canonical conversation records (system, user, assistant JSON answer)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt, answer = _case(rng)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return records


def tiny_preference_records(n: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """n canonical preference records: chosen = the right JSON answer, rejected = a wrong pathology."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt, answer = _case(rng)
        wrong = json.loads(answer)
        wrong["pathologie"] = rng.choice([r[0] for r in RULES if r[0] != wrong["pathologie"]])
        records.append(
            {
                "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": json.dumps(wrong, ensure_ascii=False)}],
            }
        )
    return records


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Tokenizer training texts: aria-like prompts and JSON answers plus a few headache-style sentences."""
    texts = []
    for r in tiny_chat_records(n, seed):
        texts.extend(m["content"] for m in r["messages"])
    texts += [
        "Pour préciser: début brutal ? fièvre, vomissements, perte de connaissance ?",
        "Recommandation: IRM cérébrale en urgence (céphalée en coup de tonnerre).",
        "Patiente de 34 ans, maux de tête depuis trois jours, pas de fièvre, absence de déficit focal.",
    ]
    return sorted(set(texts))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`factory(name="m", seed=0, texts=None, **embedded_config) -> Path` builds a fresh embedded model."""
    from medtune.config import EmbeddedModelConfig
    from medtune.train.models import build_embedded_model

    def factory(name: str = "model", seed: int = 0, texts: list[str] | None = None, **config: Any) -> Path:
        config.setdefault("size", "tiny")
        config.setdefault("vocab_size", 512)
        out = tmp_path_factory.mktemp("tiny_models") / name
        return build_embedded_model(
            texts if texts is not None else tiny_corpus(), EmbeddedModelConfig(**config), out, seed=seed
        )

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """A saved tiny embedded model (HF format, chatml, <|im_end|> eos). Treat as read-only."""
    return tiny_model_factory("tiny")


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """The tiny model with grouped-query attention: its two query heads share one key/value head."""
    return tiny_model_factory("gqa", num_kv_heads=1)


@pytest.fixture(scope="session")
def tiny_sft_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 16 full-SFT steps (a few seconds). Treat as read-only."""
    from medtune.config import ModelConfig, StageConfig
    from medtune.train.sft import train_sft

    stage = StageConfig(max_steps=16, learning_rate=5e-3, batch_size=8, save_steps=1000, logging_steps=4)
    out = tmp_path_factory.mktemp("tiny_sft")
    return train_sft(
        tiny_model_dir, tiny_chat_records(32), None, stage, ModelConfig(), out, seed=0
    ).output_dir


@pytest.fixture(scope="session")
def tiny_sliding_window_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a MistralForCausalLM (same weight names) with sliding_window=8. Read-only."""
    out = tmp_path_factory.mktemp("tiny_sliding") / "mistral"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=8)
    (out / "config.json").write_text(json.dumps(config))
    return out
