"""What batching buys on this CPU: the model's matrix products at 1-16 rows, and the engine without HTTP.

    python bench/batching_bench.py --run runs/aria

1. The model's own linear layers (every `nn.Linear` of the served model, at its own shapes) on one thread,
   as the engine's decoding thread runs them, with 1, 2, 4, 8 and 16 rows: the time of all of them (one
   decoding step's matrix products) and its growth against one row. A batch is cheap only if that grows
   slower than the rows do.
2. The transformers engine in process, no HTTP server and no client: the production ARIA diagnosis call
   (json_schema, temperature 0.1, max_tokens 256, the server's default engine options) for `--requests`
   cases, one at a time and from 8 concurrent callers, in `--rounds` alternating rounds: requests/s and
   the ratio of each round. The HTTP benchmark (`serve_bench.py`) adds work on both paths (the server's
   event loop, the client), so its ratio is bounded by this one on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from medtune.serve.cli import resolve_model
from medtune.serve.engines import EngineOptions, create_engine
from medtune.serve.engines.base import Constraint, GenerationRequest, SamplingParams
from medtune.tasks import get_task

TASK = get_task("aria")
ROWS = (1, 2, 4, 8, 16)


def linear_shapes(model: Path) -> Counter:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return Counter((m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear))


def time_linears(shapes: Counter, rows: int, calls: int = 300) -> float:
    """Seconds for one call of every linear in `shapes` with `rows` rows (median of 7 timings)."""
    weights = [(torch.randn(o, i), count) for (i, o), count in shapes.items()]
    inputs = {i: torch.randn(rows, i) for i, _ in shapes}

    def one_step() -> None:
        for w, count in weights:
            for _ in range(count):
                F.linear(inputs[w.shape[1]], w)

    for _ in range(20):
        one_step()
    timings = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            one_step()
        timings.append((time.perf_counter() - t0) / calls)
    return statistics.median(timings)


async def throughput(engine, reqs: list[GenerationRequest], callers: int) -> float:
    todo = list(reqs)

    async def caller() -> None:
        while todo:
            await engine.generate(todo.pop())

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(reqs) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/aria", help="run folder (its newest merged stage)")
    parser.add_argument("--requests", type=int, default=200, help="diagnosis calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    args = parser.parse_args()
    model = resolve_model(args.run)

    torch.set_num_threads(1)
    shapes = linear_shapes(model)
    step = {rows: time_linears(shapes, rows) for rows in ROWS}
    print(f"model {model}: {sum(shapes.values())} linear layers, one thread")
    print("| rows | all linears of one step | vs 1 row | per row |")
    print("|---:|---:|---:|---:|")
    for rows, seconds in step.items():
        print(
            f"| {rows} | {1e6 * seconds:.0f} us | {seconds / step[1]:.1f}x | {1e6 * seconds / rows:.0f} us |"
        )

    engine = create_engine("transformers", str(model), options=EngineOptions())  # the server's defaults
    engine.start()
    try:
        constraint = Constraint("json_schema", TASK.response_format()["json_schema"]["schema"])
        records = TASK.generate_inputs(args.requests, seed=7)
        reqs = [GenerationRequest(prompt=engine.render(TASK.messages(r)), constraint=constraint,
                                  sampling=SamplingParams(temperature=TASK.temperature, max_tokens=TASK.max_tokens, seed=i))
                for i, r in enumerate(records)]  # fmt: skip
        asyncio.run(throughput(engine, reqs[:20], 8))  # warm-up: the schema compiled, caches filled
        rounds = []
        for _ in range(args.rounds):
            one = asyncio.run(throughput(engine, reqs, 1))
            eight = asyncio.run(throughput(engine, reqs, 8))
            rounds.append((one, eight, eight / one))
    finally:
        engine.close()
    print(f"\nengine in process (no HTTP), {args.requests} diagnosis calls, {args.rounds} alternating rounds")
    print("| round | 1 caller | 8 callers | ratio |")
    print("|---|---:|---:|---:|")
    for i, (one, eight, ratio) in enumerate(rounds, 1):
        print(f"| {i} | {one:.1f} req/s | {eight:.1f} req/s | {ratio:.2f}x |")
    med = [statistics.median(r[k] for r in rounds) for k in range(3)]
    print(f"| median | {med[0]:.1f} req/s | {med[1]:.1f} req/s | {med[2]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
