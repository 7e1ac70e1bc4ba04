"""Live-server fixtures (owned by the serving area): a real `medtune serve` subprocess on a free port.

- `served_model_dir`: the tiny embedded model after a short full SFT on aria-like JSON answers (it
  closes its JSON strings, so constrained answers finish well inside max_tokens). Read-only.
- `lora_adapters`: {"derm": path, "radio": path}, two tiny LoRA adapters trained on that base to
  answer "Avis dermatologique." / "Avis radiologique." whatever the question: outputs anyone can tell apart.
- `server_factory(model, adapters=..., engine="transformers", args=[...], env={...}) -> ServerHandle`
  starts `python -m medtune.cli serve` on a free port, waits for /health, stops it at session end.
  `handle.client()` is an `openai.OpenAI` client on it; `handle.stop()` stops it early (SIGTERM).
- `live_server`: the shared server (served_model_dir + both adapters, API key "test-key", served name
  "aria-ft"). Parametrise it indirectly to change the engine: `@pytest.mark.parametrize("live_server",
  ["transformers"], indirect=True)`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ServerHandle", "free_port", "live_server", "lora_adapters", "served_model_dir", "server_factory"]

API_KEY = "test-key"
SERVED_NAME = "aria-ft"
ADAPTER_ANSWERS = {"derm": "Avis dermatologique.", "radio": "Avis radiologique."}
STARTUP_TIMEOUT = 180.0  # seconds; torch + transformers imports are slow on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    base_url: str  # http://127.0.0.1:PORT (without /v1)
    api_key: str | None
    process: subprocess.Popen
    log_path: Path
    served_name: str = SERVED_NAME
    adapters: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        kwargs.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        kwargs.setdefault("api_key", self.api_key or "none")
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", **kwargs)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains), then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _wait_healthy(handle: ServerHandle) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(f"medtune serve exited with {handle.process.returncode}:\n{handle.log()}")
        try:
            if httpx.get(f"{handle.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    handle.stop()
    raise RuntimeError(f"medtune serve did not become healthy in {STARTUP_TIMEOUT:.0f} s:\n{handle.log()}")


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerHandle]]:
    started: list[ServerHandle] = []

    def start(
        model: str | Path,
        *,
        adapters: dict[str, str | Path] | None = None,
        engine: str = "transformers",
        api_key: str | None = API_KEY,
        served_name: str = SERVED_NAME,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> ServerHandle:
        port = free_port()
        cmd = [sys.executable, "-m", "medtune.cli", "serve", "--model", str(model), "--engine", engine,
               "--port", str(port), "--served-name", served_name, "--threads", "1"]  # fmt: skip
        if api_key:
            cmd += ["--api-key", api_key]
        for name, path in (adapters or {}).items():
            cmd += ["--adapter", f"{name}={path}"]
        cmd += args or []
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        # A clean environment: no MEDTUNE_* from the developer's shell or .env changes the server.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
        child_env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
        child_env.update(env or {})
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                       cwd=log_path.parent)  # fmt: skip
        handle = ServerHandle(f"http://127.0.0.1:{port}", api_key, process, log_path, served_name,
                              {k: str(v) for k, v in (adapters or {}).items()})  # fmt: skip
        started.append(handle)
        _wait_healthy(handle)
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            handle.process.kill()
            handle.process.wait()


@pytest.fixture(scope="session")
def served_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 40 full-SFT steps on aria-like JSON answers (closes its strings)."""
    from fixtures_models import tiny_chat_records
    from medtune.config import ModelConfig, StageConfig
    from medtune.train.sft import train_sft

    stage = StageConfig(max_steps=40, learning_rate=5e-3, batch_size=8, save_steps=1000, logging_steps=10,
                        validation_split=0.0)  # fmt: skip
    out = tmp_path_factory.mktemp("served_model")
    return train_sft(
        tiny_model_dir, tiny_chat_records(64), None, stage, ModelConfig(), out, seed=0
    ).output_dir


def _train_adapter(base: Path, questions: list[str], answer: str, out: Path, seed: int) -> Path:
    """A LoRA adapter (PEFT) that answers every question with `answer`: a few dozen optimiser steps.

    A plain loop rather than `medtune.train.sft`: a fixed answer needs no trainer, and this keeps the
    serving tests independent of the training stack's defaults. The tiny model's tied output
    embeddings are too small for low-rank updates alone to make it confident, so the adapter also
    keeps its own copy of the output layer (PEFT `modules_to_save`), which mixed batches route too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.data.templates import render_chat

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"]
        ),
    )
    rows = []
    for q in questions:
        prompt = render_chat([{"role": "user", "content": q}], tokenizer, add_generation_prompt=True)
        ids = tokenizer(prompt + answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(40):
        batch = [rows[(step * 8 + i) % len(rows)] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_adapters(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on `served_model_dir` that answer every question with their own fixed sentence."""
    from fixtures_models import tiny_chat_records

    questions = [r["messages"][1]["content"] for r in tiny_chat_records(24, seed=3)] + [
        "Bonjour",
        "Diagnostic ?",
    ]
    return {
        name: _train_adapter(
            served_model_dir, questions, answer, tmp_path_factory.mktemp(f"adapter_{name}"), i
        )
        for i, (name, answer) in enumerate(ADAPTER_ANSWERS.items())
    }


@pytest.fixture(scope="session")
def live_server(
    request: pytest.FixtureRequest,
    server_factory: Callable[..., ServerHandle],
    served_model_dir: Path,
    lora_adapters: dict[str, Path],
) -> ServerHandle:
    engine = getattr(request, "param", "transformers")
    return server_factory(served_model_dir, adapters=lora_adapters, engine=engine)
