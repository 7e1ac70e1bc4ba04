"""Jump-forward decoding on the held-out ARIA cases: the same answers, fewer decoding steps.

    python bench/jump_forward_bench.py --run runs/aria

The run's final model answers every held-out case (data/test.jsonl) with the production request
(json_schema response_format, max_tokens 256) in the transformers engine, in process, with jump-forward
decoding on and off: greedily (answers compared token for token) and at the production temperature 0.1
with one seed per case (sampling draws differ once fewer tokens are sampled, so answers may differ;
accuracy is compared). Prints pathology exact match, identical answers, tokens per answer and how many
of them were forced by the schema (fed without a decoding step of their own), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medtune.serve.cli import resolve_model
from medtune.serve.engines import EngineOptions, create_engine
from medtune.serve.engines.base import Constraint, GenerationRequest, SamplingParams
from medtune.tasks import get_task

TASK = get_task("aria")


def answer_all(model: Path, records: list[dict], jump_forward: bool, temperature: float) -> dict:
    engine = create_engine("transformers", str(model),
                           options=EngineOptions(max_batch_size=16, max_queue=len(records), jump_forward=jump_forward))  # fmt: skip
    engine.start()
    try:
        constraint = Constraint("json_schema", TASK.response_format()["json_schema"]["schema"])
        reqs = [GenerationRequest(messages=TASK.messages(r), constraint=constraint,
                                  sampling=SamplingParams(temperature=temperature, max_tokens=TASK.max_tokens, seed=i))
                for i, r in enumerate(records)]  # fmt: skip
        t0 = time.perf_counter()
        results = engine.generate_batch(reqs)
        seconds = time.perf_counter() - t0
        return {"results": results, "seconds": seconds, "forced": engine.forced_tokens}
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", default="runs/aria", help="run folder (its newest merged stage, its test set)"
    )
    args = parser.parse_args()
    run = Path(args.run)
    model = resolve_model(str(run))
    examples = [
        json.loads(line) for line in (run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    records = [ex["input"] for ex in examples]
    print(f"model {model}, {len(records)} held-out cases")
    print(
        "| decoding | temperature | pathology exact match | identical answers | tokens per answer | forced | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for temperature in (0.0, TASK.temperature):
        runs = {jf: answer_all(model, records, jf, temperature) for jf in (False, True)}
        texts = {jf: [r.text for r in out["results"]] for jf, out in runs.items()}
        same = sum(a == b for a, b in zip(texts[False], texts[True], strict=True))
        for jf, out in runs.items():
            tokens = sum(r.completion_tokens for r in out["results"])
            score = TASK.score(examples, texts[jf])["pathology_exact_match"]
            name = "jump-forward" if jf else "token by token"
            print(f"| {name} | {temperature} | {100 * score:.1f}% | {same}/{len(records)} | "
                  f"{tokens / len(records):.1f} | {100 * out['forced'] / tokens:.0f}% | {out['seconds']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
