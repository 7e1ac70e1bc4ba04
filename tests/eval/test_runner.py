"""`medtune eval` on a model folder: answers streamed to disk, scored, reported; a killed run resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from medtune.errors import ConfigError, DataError
from medtune.eval.runner import PREDICTIONS, api_base, read_examples, run_eval
from medtune.tasks import get_task


def _keys(out):
    return [json.loads(line)["key"] for line in (out / PREDICTIONS).read_text(encoding="utf-8").splitlines()]


def _aria(max_tokens=48):
    task = get_task("aria")
    task.max_tokens = max_tokens  # an untrained model rambles: keep its answers short
    return task


def test_local_eval_writes_answers_metrics_and_report(tiny_model_dir, tmp_path):
    task = _aria(32)
    examples = task.generate_test(4, seed=4)
    result = run_eval(task, examples, tmp_path, model_path=tiny_model_dir, batch_size=2, show_progress=False)
    assert result["answered"] == 4 and result["errors"] == 0
    answers = [json.loads(line) for line in (tmp_path / PREDICTIONS).read_text(encoding="utf-8").splitlines()]
    assert len(answers) == 4
    # Constrained decoding: every finished answer is schema-valid JSON naming a known pathology.
    for a in answers:
        if a["finish_reason"] == "stop":
            assert json.loads(a["prediction"])["pathologie"] in task.labels
    saved = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["pathology_exact_match"] == result["metrics"]["pathology_exact_match"]
    # A second run finds everything done and sends nothing: same answers, same file.
    before = (tmp_path / PREDICTIONS).read_text(encoding="utf-8")
    again = run_eval(task, examples, tmp_path, model_path=tiny_model_dir, show_progress=False)
    assert (tmp_path / PREDICTIONS).read_text(encoding="utf-8") == before
    assert again["metrics"]["pathology_exact_match"] == result["metrics"]["pathology_exact_match"]


def test_answers_of_another_model_are_not_mixed_in(tiny_model_dir, tmp_path):
    task = _aria(8)
    examples = task.generate_test(2, seed=4)
    run_eval(task, examples, tmp_path, model_path=tiny_model_dir, show_progress=False)
    with pytest.raises(ConfigError, match="another evaluation"):
        run_eval(task, examples, tmp_path, endpoint="http://127.0.0.1:9", model="x", show_progress=False)


def test_endpoint_or_model_path_exactly_one(tmp_path):
    task = get_task("aria")
    with pytest.raises(ConfigError, match="either"):
        run_eval(task, [], tmp_path)
    with pytest.raises(ConfigError, match="needs --model"):
        run_eval(task, [], tmp_path, endpoint="http://127.0.0.1:8001")


def test_api_base_accepts_root_or_v1():
    assert api_base("http://h:8001") == "http://h:8001/v1"
    assert api_base("http://h:11434/v1/") == "http://h:11434/v1"


def test_bad_data_line_is_named(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"input": {}}\n{"input": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"test.jsonl:2"):
        read_examples(f, get_task("aria"))


def test_interrupted_local_eval_resumes_without_regenerating(tiny_model_dir, tmp_path, monkeypatch):
    import medtune.eval.runner as runner

    task = _aria(16)
    examples = task.generate_test(10, seed=9)
    real_write = runner._Appender.write
    written = []

    def write_then_stop(self, record):
        real_write(self, record)
        written.append(record["key"])
        if len(written) == 4:  # stop like Ctrl-C after the first batch of answers reached the disk
            raise KeyboardInterrupt

    monkeypatch.setattr(runner._Appender, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_eval(task, examples, tmp_path, model_path=tiny_model_dir, batch_size=1, show_progress=False)
    first = _keys(tmp_path)
    assert len(first) == 4
    monkeypatch.setattr(runner._Appender, "write", real_write)
    generated = []
    real_generate = runner.generate_answers

    def counting_generate(path, requests, **kwargs):
        generated.extend(requests)
        return real_generate(path, requests, **kwargs)

    monkeypatch.setattr(runner, "generate_answers", counting_generate)
    result = run_eval(task, examples, tmp_path, model_path=tiny_model_dir, batch_size=1, show_progress=False)
    assert len(generated) == 6  # only the requests without an answer were generated again
    keys = _keys(tmp_path)
    assert keys[:4] == first and len(keys) == len(set(keys)) == 10
    assert result["answered"] == 10


def test_endpoint_eval_writes_answers_and_a_report_with_plots(live_server, tmp_path):
    from medtune.eval.report import write_report

    task = get_task("aria")
    examples = task.generate_test(12, seed=6)
    result = run_eval(
        task, examples, tmp_path, endpoint=live_server.base_url, model=live_server.served_name,
        api_key=live_server.api_key, concurrency=4, show_progress=False,
    )  # fmt: skip
    assert result["answered"] == 12 and result["errors"] == 0
    # The production request is constrained by the aria schema: every answer is valid JSON.
    assert result["metrics"]["json_valid"] == 1.0
    assert len(result["latencies_s"]) == 12
    md = write_report(tmp_path)
    png = tmp_path / "plots" / "confusion.png"
    assert png.stat().st_size > 2000 and "plots/confusion.png" in md.read_text(encoding="utf-8")
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert {t["metric"]: t["passed"] for t in results["targets"]}["json_valid"] is True


def test_killed_endpoint_eval_resumes_without_repeating_requests(live_server, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "medtune.cli", "eval", "--task", "aria", "--generate", "16", "--seed", "8",
           "--endpoint", live_server.base_url, "--model", live_server.served_name, "--api-key",
           live_server.api_key, "--concurrency", "1", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / PREDICTIONS).exists() and len(_keys(out)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the eval finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = _keys(out)
    assert 3 <= len(first) < 16
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = _keys(out)
    assert keys[: len(first)] == first
    assert len(keys) == len(set(keys)) == 16
    assert json.loads((out / "eval.json").read_text(encoding="utf-8"))["metrics"]["json_valid"] == 1.0


def test_qa_eval_reads_alpaca_and_scores_free_text(tiny_model_dir, tmp_path):
    from medtune.eval.metrics import QaTask

    data = tmp_path / "derm.jsonl"
    rows = [
        {"instruction": "Diagnostic d'une lésion érythémato-squameuse en plaques ?", "input": "",
         "output": "Psoriasis vulgaris : plaques bien délimitées."},
        {"instruction": "Critères du mélanome ?", "input": "", "output": "Critères ABCDE, biopsie excisionnelle."},
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = QaTask(terms=["psoriasis", "biopsie"], max_tokens=12)
    examples = read_examples(data, task)
    assert examples[0]["messages"][-1] == {"role": "assistant", "content": rows[0]["output"]}
    result = run_eval(task, examples, tmp_path / "out", model_path=tiny_model_dir, show_progress=False)
    m = result["metrics"]
    assert result["answered"] == 2
    assert 0.0 <= m["bleu"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0 and 0.0 <= m["terminology_coverage"] <= 1.0
    assert set(m["ci"]) >= {"bleu", "rouge_l"}
