"""Evaluate a model folder in-process: the task's production requests, batched, scored by the task.

    from medtune.eval.local import evaluate_model
    result = evaluate_model("runs/aria/dpo", get_task("aria"), task.generate_test(300, seed=2))
    result.metrics["pathology_exact_match"], result.predictions[0]

This is what the training pipeline calls after each stage (base -> SFT -> DPO) and what
`medtune eval --model-path` runs. Each example is sent as production sends it (the example's
system + user messages, the task's `response_format`, its `max_tokens`), decoded greedily so that
two evaluations of one model agree. Generation goes through the serving engine's batch API
(`medtune.serve.engines.transformers`), so evaluation measures exactly what the server answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import DataError, ModelError
from medtune.eval.metrics import score_predictions
from medtune.serve.engines import EngineOptions, create_engine
from medtune.serve.engines.base import Constraint, GenerationRequest, SamplingParams
from medtune.serve.errors import ServeError
from medtune.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Raw model outputs (one per example, in order) and the task's metrics on them."""

    predictions: list[str]
    metrics: dict[str, Any]
    finish_reasons: list[str] = field(default_factory=list)


def request_messages(
    example: dict[str, Any], task: Task | None, where: str = "example"
) -> list[dict[str, str]]:
    """The messages production sends for a test example: its `messages` without a final assistant
    turn, or the task's messages for its `input` record."""
    messages = example.get("messages")
    if messages:
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: 'messages' holds only an assistant answer, no request to send")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if task is not None and "input" in example:
        return task.messages(task.validate_input(example["input"]))
    raise DataError(
        f"{where}: expected 'messages' (system/user turns) or 'input' (a task record), found neither"
    )


def evaluate_model(
    model_path: str | Path,
    task: Task,
    examples: list[dict[str, Any]],
    *,
    constrained: bool = True,
    batch_size: int = 16,
    engine: str = "transformers",
    on_batch: Callable[[int, list[str], list[str]], None] | None = None,
) -> EvalResult:
    """Generate an answer for every example with the model at `model_path` and score them.

    Metrics are the task's, plus `ci` (bootstrap 95% intervals on the headline metrics) and
    `truncated` (share of answers cut by max_tokens).
    `constrained=False` drops the task's `response_format` (to measure what the model does unaided).
    `engine` names the serving engine that generates (`llamacpp` evaluates a GGUF file).
    `on_batch(start_index, predictions, finish_reasons)` is called after each batch (progress, streaming to disk).
    """
    if not examples:
        raise DataError("evaluate_model: no examples to evaluate")
    requests = [request_messages(ex, task, where=f"example {i}") for i, ex in enumerate(examples)]
    response_format = task.response_format() if constrained else None
    predictions, finish = generate_answers(
        model_path,
        requests,
        response_format=response_format,
        max_tokens=task.max_tokens,
        batch_size=batch_size,
        engine=engine,
        on_batch=on_batch,
    )
    metrics = score_predictions(task, examples, predictions)
    cut = sum(1 for f in finish if f == "length")
    metrics["truncated"] = cut / len(finish) if finish else 0.0
    return EvalResult(predictions=predictions, metrics=metrics, finish_reasons=finish)


def response_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """The engine constraint for an OpenAI `response_format` (None for free text)."""
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_schema":
        return Constraint("json_schema", response_format["json_schema"]["schema"])
    if response_format.get("type") == "json_object":
        return Constraint("json_object")
    raise DataError(
        f"response_format: expected type text, json_object or json_schema, found {response_format!r}"
    )


def generate_answers(
    model_path: str | Path,
    requests: list[list[dict[str, str]]],
    *,
    response_format: dict[str, Any] | None,
    max_tokens: int,
    batch_size: int = 16,
    engine: str = "transformers",
    on_batch: Callable[[int, list[str], list[str]], None] | None = None,
) -> tuple[list[str], list[str]]:
    """Greedy answers (and finish reasons) for chat requests, decoded `batch_size` at a time, through the
    serving engine called `engine` (transformers for HF folders, llamacpp for GGUF files)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise ModelError(f"{model_path}: model not found")
    constraint = response_constraint(response_format)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    # Requests go in chunks of a few batches: the engine keeps its batch full across a chunk.
    chunk = 4 * batch_size
    runner = create_engine(
        engine, str(model_path), options=EngineOptions(max_batch_size=batch_size, max_queue=chunk)
    )
    runner.start()
    predictions: list[str] = []
    finish: list[str] = []
    try:
        for i, messages in enumerate(requests):
            # Find a request that cannot fit before generating anything, and say which one it is.
            try:
                runner.check_lengths(runner.count_tokens(runner.render(messages)), max_tokens)
            except ServeError as exc:
                raise DataError(f"example {i + 1}: {exc}") from None
        for start in range(0, len(requests), chunk):
            batch = requests[start : start + chunk]
            results = runner.generate_batch(
                [GenerationRequest(messages=m, sampling=sampling, constraint=constraint) for m in batch]
            )
            texts, reasons = [r.text for r in results], [r.finish_reason for r in results]
            predictions.extend(texts)
            finish.extend(reasons)
            if on_batch is not None:
                on_batch(start, texts, reasons)
    finally:
        runner.close()
    return predictions, finish
