"""The export numbers: GGUF fidelity and accuracy per quantization, file sizes, speed, and our llama.cpp
server against llama-cpp-python's own server on the same file.

    python bench/export_bench.py --run runs/aria            # measure and print
    python bench/export_bench.py --run runs/aria --write    # also rewrite BENCHMARKS.md's export section

On the run's final model (runs/aria/dpo after `make demo`) it:

1. exports F16, Q8_0 and Q4_K_M GGUF files with `medtune.export.gguf` (llama.cpp's converter and quantizer);
2. fidelity: greedy answers (no constraint) of the F16 file (llamacpp engine) against the Hugging Face
   model (transformers engine) on the first --fidelity held-out aria prompts: identical texts counted;
3. accuracy: `medtune.eval.local.evaluate_model` on the whole held-out set for the HF model and each
   file (constrained, greedy, as the pipeline's eval stage): pathology exact match and valid JSON;
4. speed: decode tokens/s of one request at a time (unconstrained, 128 tokens) per format, each in a
   process of its own (`isolated`);
5. serving: `medtune serve --engine llamacpp` and `python -m llama_cpp.server` on the Q8_0 file, same
   threads and context, the aria diagnosis call (temperature 0.1, max_tokens 256, the JSON schema
   sent in each server's own dialect: `json_schema` for ours, `json_object` + `schema` for theirs),
   --requests sequential calls each (P50/P99), then 8 concurrent clients (requests/s).

The client loop is written here rather than `medtune bench` because llama-cpp-python's server does
not accept OpenAI's `json_schema` response format, so each server needs its own request body.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from medtune.export.gguf import export_ggufs, human_size
from medtune.export.runs import final_model_dir, read_manifest
from medtune.io import write_text
from medtune.serve.engines import EngineOptions, create_engine
from medtune.serve.engines.base import GenerationRequest, SamplingParams
from medtune.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- section: export -->", "<!-- end: export -->"
QUANTS = ["f16", "q8_0", "q4_k_m"]
THREADS = 2


def test_examples(run: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(run)
    path = run / manifest["data_files"]["test"]["path"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def messages_of(example: dict[str, Any]) -> list[dict[str, str]]:
    return [m for m in example["messages"] if m["role"] != "assistant"]


def isolated(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a fresh process. Timings run there: in a process where torch has already run
    with 2 OpenMP threads (the transformers engine), llama.cpp's 2-thread decoding measured up to ~1.8x
    slower (1.7-1.8k instead of 2.6-3.3k tokens/s on the F16 file), so each measurement gets a process
    of its own, as each server has in production."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def greedy_texts(
    engine_name: str, model: Path, prompts: list[list[dict[str, str]]], max_tokens: int
) -> list[str]:
    engine = create_engine(engine_name, str(model), options=EngineOptions(max_batch_size=16, threads=THREADS))
    engine.start()
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        return [
            r.text
            for r in engine.generate_batch(
                [GenerationRequest(messages=m, sampling=sampling) for m in prompts]
            )
        ]
    finally:
        engine.close()


def decode_speed(
    engine_name: str, model: Path, prompts: list[list[dict[str, str]]], tokens: int = 128
) -> float:
    """Tokens per second of one request at a time (unconstrained, a fixed budget, stop on EOS)."""
    engine = create_engine(engine_name, str(model), options=EngineOptions(max_batch_size=1, threads=THREADS))
    engine.start()
    try:
        engine.generate_batch(
            [GenerationRequest(messages=prompts[0], sampling=SamplingParams(temperature=0, max_tokens=8))]
        )
        done, seconds = 0, 0.0
        for m in prompts:
            t0 = time.perf_counter()
            (result,) = engine.generate_batch(
                [GenerationRequest(messages=m, sampling=SamplingParams(temperature=0, max_tokens=tokens))]
            )
            seconds += time.perf_counter() - t0
            done += result.completion_tokens
        return done / seconds
    finally:
        engine.close()


def accuracy(engine_name: str, model: Path, examples: list[dict[str, Any]]) -> dict[str, float]:
    from medtune.eval.local import evaluate_model

    result = evaluate_model(
        model, get_task("aria"), examples, constrained=True, batch_size=16, engine=engine_name
    )
    return {k: result.metrics[k] for k in ("pathology_exact_match", "json_valid", "schema_valid")}


def grammar_overhead(gguf: Path, prompts: list[list[dict[str, str]]]) -> dict[str, float]:
    """Decode ms per token (first token to last, streamed: prompt processing left out) with and without
    the aria JSON schema: xgrammar in our engine (jump-forward decoding off: the grammar's own cost, as
    llama.cpp's sampler has no jump-forward), llama.cpp's GBNF (LlamaGrammar from the schema) in
    llama-cpp-python's `Llama`; one request at a time, alternating."""
    from llama_cpp import Llama

    from medtune.export.gguf import native_output
    from medtune.serve.engines.base import Constraint

    schema = get_task("aria").output_schema()
    options = EngineOptions(max_batch_size=1, threads=THREADS, jump_forward=False)
    engine = create_engine("llamacpp", str(gguf), options=options)
    engine.start()
    with native_output():
        llm = Llama(
            model_path=str(gguf), n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
        )
    times: dict[str, list[float]] = {k: [0.0, 0.0] for k in ("xgrammar", "xgrammar_off", "gbnf", "gbnf_off")}

    async def ours(req: GenerationRequest) -> tuple[float, int]:
        stamps = [(time.perf_counter(), len(d.token_ids)) async for d in engine.stream(req) if d.token_ids]
        return stamps[-1][0] - stamps[0][0], sum(n for _, n in stamps[1:])  # tokens after the first delta

    try:
        for m in prompts:
            for constrained in (True, False):
                c = Constraint("json_schema", schema) if constrained else None
                req = GenerationRequest(
                    messages=m, sampling=SamplingParams(temperature=0, max_tokens=96), constraint=c
                )
                seconds, n = asyncio.run(ours(req))
                key = "xgrammar" if constrained else "xgrammar_off"
                times[key][0] += seconds
                times[key][1] += n
                fmt = {"type": "json_object", "schema": schema} if constrained else None
                stamps = [time.perf_counter() for _ in llm.create_chat_completion(
                    messages=m, temperature=0, max_tokens=96, response_format=fmt, stream=True)]  # fmt: skip
                key = "gbnf" if constrained else "gbnf_off"
                times[key][0] += stamps[-1] - stamps[1]  # chunk 0 is the role, chunk 1 the first token
                times[key][1] += len(stamps) - 3  # minus role, first token and the final empty chunk
    finally:
        engine.close()
        with native_output():
            llm.close()
    return {k: 1000 * t / max(1, n) for k, (t, n) in times.items()}


# --------------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], url: str, probe: str, log: Path) -> Iterator[None]:
    """Start a server subprocess, wait until `probe` answers 200, stop it (SIGTERM, then kill) at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(url + probe, timeout=2, headers={"Authorization": "Bearer bench"}).status_code
                    == 200
                ):
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text()[-3000:]}")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _body(messages: list[dict[str, str]], schema: dict[str, Any], dialect: str) -> dict[str, Any]:
    response_format = (
        {"type": "json_schema", "json_schema": {"name": "diagnostic", "schema": schema, "strict": True}}
        if dialect == "openai"
        else {"type": "json_object", "schema": schema}
    )
    return {"model": "aria-ft", "messages": messages, "temperature": 0.1, "max_tokens": 256,
            "response_format": response_format}  # fmt: skip


async def _calls(
    url: str, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[list[float], list[str], list[int], float]:
    latencies: list[float] = [0.0] * len(bodies)
    texts: list[str] = [""] * len(bodies)
    tokens: list[int] = [0] * len(bodies)
    queue = list(enumerate(bodies))
    async with httpx.AsyncClient(
        base_url=url, timeout=120, headers={"Authorization": "Bearer bench"}
    ) as client:

        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                t0 = time.perf_counter()
                resp = await client.post("/v1/chat/completions", json=body)
                latencies[i] = time.perf_counter() - t0
                if resp.status_code != 200:  # counted (no text, no tokens), not fatal: the table says so
                    texts[i] = f"HTTP {resp.status_code}"
                    continue
                data = resp.json()
                texts[i] = data["choices"][0]["message"]["content"]
                tokens[i] = data["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, texts, tokens, wall


def measure_servers(urls: dict[str, str], prompts: list[list[dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """Sequential calls alternating between the servers (both up at once, one busy at a time, so that
    the load of a shared machine falls on both alike), then 8 concurrent clients on each in turn."""
    schema = get_task("aria").output_schema()
    bodies = {
        name: [_body(m, schema, "openai" if name == "ours" else "llama_cpp") for m in prompts]
        for name in urls
    }
    for name, url in urls.items():
        asyncio.run(_calls(url, bodies[name][:3], 1))  # warm-up
    results: dict[str, dict[str, Any]] = {name: {"lat": [], "texts": [], "tokens": []} for name in urls}
    for i in range(len(prompts)):
        order = list(urls) if i % 2 == 0 else list(reversed(urls))
        for name in order:
            lat, texts, tokens, _ = asyncio.run(_calls(urls[name], [bodies[name][i]], 1))
            results[name]["lat"] += lat
            results[name]["texts"] += texts
            results[name]["tokens"] += tokens
    for name, url in urls.items():
        _, _, _, wall8 = asyncio.run(_calls(url, bodies[name], 8))
        r = results[name]
        q = statistics.quantiles(r["lat"], n=100)
        r.update(p50=statistics.median(r["lat"]), p99=q[98], mean_tokens=statistics.mean(r["tokens"]),
                 ms_per_token=1000 * sum(r["lat"]) / max(1, sum(r["tokens"])),
                 valid=sum(_is_valid(t, schema) for t in r["texts"]) / len(r["texts"]), rps8=len(prompts) / wall8)  # fmt: skip
    return results


def _is_valid(text: str, schema: dict[str, Any]) -> bool:
    from jsonschema import Draft202012Validator

    try:
        return Draft202012Validator(schema).is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


def compare_servers(gguf: Path, prompts: list[list[dict[str, str]]], work: Path, ctx: int) -> dict[str, Any]:
    ours_port, theirs_port = free_port(), free_port()
    ours_url, theirs_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
    ours_cmd = [sys.executable, "-m", "medtune.cli", "serve", "--engine", "llamacpp", "--model", str(gguf),
                "--port", str(ours_port), "--api-key", "bench", "--served-name", "aria-ft", "--threads", str(THREADS),
                "--max-batch-size", "8", "--max-model-len", str(ctx)]  # fmt: skip
    theirs_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(theirs_port),
                  "--api_key", "bench", "--model_alias", "aria-ft", "--n_threads", str(THREADS),
                  "--n_threads_batch", str(THREADS), "--n_ctx", str(ctx), "--verbose", "false"]  # fmt: skip
    with (
        server(ours_cmd, ours_url, "/health", work / "ours.log"),
        server(theirs_cmd, theirs_url, "/v1/models", work / "theirs.log"),
    ):
        results: dict[str, Any] = measure_servers({"ours": ours_url, "theirs": theirs_url}, prompts)
    same = sum(a == b for a, b in zip(results["ours"]["texts"], results["theirs"]["texts"], strict=True))
    results["same_answers"] = same / len(prompts)
    return results


# --------------------------------------------------------------------------------------------------


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/aria")
    parser.add_argument("--fidelity", type=int, default=60, help="prompts compared token for token (>= 50)")
    parser.add_argument("--requests", type=int, default=60, help="diagnosis calls per server")
    parser.add_argument("--out-dir", help="where the GGUF files go (default: a temporary folder)")
    parser.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's export section")
    args = parser.parse_args()

    run = Path(args.run)
    model = final_model_dir(run)
    examples = test_examples(run)
    prompts = [messages_of(e) for e in examples]
    with tempfile.TemporaryDirectory(prefix="medtune-export-bench-") as tmp:
        work = Path(args.out_dir or tmp)
        step(f"exporting {model} to {', '.join(QUANTS)}")
        t0 = time.perf_counter()
        files = {f.quant: f for f in export_ggufs(model, work, QUANTS, name="aria")}
        export_seconds = time.perf_counter() - t0
        hf_size = sum(p.stat().st_size for p in model.glob("*.safetensors"))

        step(f"fidelity on {args.fidelity} prompts")
        hf_greedy = greedy_texts("transformers", model, prompts[: args.fidelity], 256)
        f16_greedy = greedy_texts("llamacpp", files["f16"].path, prompts[: args.fidelity], 256)
        identical = sum(a == b for a, b in zip(hf_greedy, f16_greedy, strict=True))

        step(f"accuracy on {len(examples)} cases and decode speed, per format")
        acc = {"hf": accuracy("transformers", model, examples)}
        speed = {"hf": isolated(decode_speed, "transformers", model, prompts[:20])}
        for q, f in files.items():
            acc[q] = accuracy("llamacpp", f.path, examples)
            speed[q] = isolated(decode_speed, "llamacpp", f.path, prompts[:20])

        step("grammar overhead")
        grammar = isolated(grammar_overhead, files["q8_0"].path, prompts[:20])
        ctx = int(json.loads((model / "config.json").read_text())["max_position_embeddings"])
        step("our server against llama_cpp.server")
        servers = compare_servers(files["q8_0"].path, prompts[: args.requests], work, ctx)

    section = render(run, model, files, hf_size, export_seconds, identical, args.fidelity, acc, speed, servers,
                     len(examples), grammar)  # fmt: skip
    print(section)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text(encoding="utf-8")
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        write_text(path, f"{head}{START}\n{section}\n{END}{tail}")
    return 0


def render(
    run: Path, model: Path, files: dict[str, Any], hf_size: int, export_seconds: float, identical: int,
    n_fidelity: int, acc: dict[str, dict[str, float]], speed: dict[str, float], servers: dict[str, Any],
    n_test: int, grammar: dict[str, float],
) -> str:  # fmt: skip
    ours, theirs = servers["ours"], servers["theirs"]
    lines = [
        f"Measured by `python bench/export_bench.py --run {run} --write` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores), {THREADS} threads, model `{model}` (the run's final model). "
        f"Export of the three files: {export_seconds:.0f} s.",
        "",
        "| format | file size | pathology exact match | valid JSON | decode tokens/s (1 request) |",
        "|---|---:|---:|---:|---:|",
        f"| HF safetensors (fp32) | {human_size(hf_size)} | {acc['hf']['pathology_exact_match']:.1%} | "
        f"{acc['hf']['json_valid']:.1%} | {speed['hf']:.0f} |",
    ]
    for q, f in files.items():
        delta = 100 * (acc[q]["pathology_exact_match"] - acc["hf"]["pathology_exact_match"])
        lines.append(f"| GGUF {q.upper()} | {human_size(f.size_bytes)} | {acc[q]['pathology_exact_match']:.1%} "
                     f"({delta:+.1f} pts) | {acc[q]['json_valid']:.1%} | {speed[q]:.0f} |")  # fmt: skip
    ratio = ours["p50"] / theirs["p50"]
    lines += [
        "",
        f"- Fidelity: greedy answers of the F16 file equal the Hugging Face model's on **{identical}/{n_fidelity}** "
        "held-out aria prompts (unconstrained, up to 256 tokens, token for token).",
        f"- Accuracy on the {n_test} held-out cases (constrained, greedy, `medtune.eval.local.evaluate_model` "
        "with the llamacpp engine for GGUF files).",
        "- Decode speed: 20 held-out prompts one at a time, up to 128 tokens each (unconstrained, greedy, prompt "
        "processing included), each format measured in a process of its own.",
        "- Q4_K_M on this model: its 192-wide rows are not multiples of 256, so llama.cpp's k-quants fall back "
        "to Q5_0/Q8_0 for most tensors (the file says so when exporting); on 4096-wide models Q4_K_M is the "
        "real 4.5-bit format.",
        "",
        "Serving the Q8_0 file, ARIA diagnosis call (temperature 0.1, max_tokens 256, JSON schema), "
        f"{len(ours['texts'])} sequential requests alternating between the two servers (both running), then 8 "
        "concurrent clients on each:",
        "",
        "| server | P50 | P99 | completion tokens (mean) | ms per token | valid JSON | 8 clients req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| `medtune serve --engine llamacpp` | {ours['p50'] * 1000:.0f} ms | {ours['p99'] * 1000:.0f} ms | "
        f"{ours['mean_tokens']:.1f} | {ours['ms_per_token']:.2f} | {ours['valid']:.0%} | {ours['rps8']:.1f} |",
        f"| `python -m llama_cpp.server` | {theirs['p50'] * 1000:.0f} ms | {theirs['p99'] * 1000:.0f} ms | "
        f"{theirs['mean_tokens']:.1f} | {theirs['ms_per_token']:.2f} | {theirs['valid']:.0%} | {theirs['rps8']:.1f} |",
        "",
        f"P50 ratio ours / theirs: **{ratio:.2f}x** (target <= 1.05x); identical answers "
        f"{servers['same_answers']:.0%}. llama-cpp-python's server decodes one request at a time behind a lock; "
        "ours decodes every running request in one `llama_decode` per step, hence the concurrent column.",
        "",
        "Constrained decoding, xgrammar (over llama.cpp's logits, our engine, jump-forward decoding off: the "
        "grammar's own cost) against llama.cpp's own GBNF grammar from the schema (llama-cpp-python's `Llama`), "
        "same Q8_0 file, one request at a time, 96 tokens at most, decode time per token from the first streamed "
        "token to the last:",
        "",
        "| | ms per token, schema | ms per token, free text | overhead |",
        "|---|---:|---:|---:|",
        f"| xgrammar (medtune) | {grammar['xgrammar']:.2f} | {grammar['xgrammar_off']:.2f} | "
        f"{grammar['xgrammar'] / grammar['xgrammar_off'] - 1:+.0%} |",
        f"| llama.cpp GBNF | {grammar['gbnf']:.2f} | {grammar['gbnf_off']:.2f} | "
        f"{grammar['gbnf'] / grammar['gbnf_off'] - 1:+.0%} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
