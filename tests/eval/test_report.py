"""Reports: plots on disk, a self-contained HTML page, pass/fail against targets, run comparison."""

import json
import re

import pytest

from medtune.errors import ConfigError
from medtune.eval.compare import compare_runs
from medtune.eval.report import check_targets, recipe_targets, write_report, write_run_report
from medtune.io import write_json

CONFUSION = {
    "Fasciite plantaire": {"Fasciite plantaire": 8, "Tendinite Achille": 1, "invalid": 1},
    "Tendinite Achille": {"Fasciite plantaire": 0, "Tendinite Achille": 10, "invalid": 0},
}


def _eval(exact: float, json_valid: float = 1.0) -> dict:
    return {
        "task": "aria",
        "model": "aria-ft",
        "n": 20,
        "errors": 0,
        "error_rate": 0.0,
        "metrics": {
            "n": 20,
            "json_valid": json_valid,
            "schema_valid": json_valid,
            "pathology_exact_match": exact,
            "confidence_agreement": 0.7,
            "confusion": CONFUSION,
            "ci": {"pathology_exact_match": [exact - 0.1, min(1.0, exact + 0.1)]},
        },
        "latencies_s": [0.2] * 20,
    }


def _level(c: int, latency: float) -> dict:
    lat = [latency * (1 + i / 20) for i in range(20)]
    return {
        "concurrency": c, "requests": 20, "errors": 0, "error_rate": 0.0, "wall_s": 2.0,
        "requests_per_s": 10.0 * c, "tokens_per_s": 300.0 * c, "latency_p50_s": latency,
        "latency_p95_s": latency * 1.9, "latency_p99_s": latency * 1.95, "ttft_p50_s": latency / 4,
        "ttft_p95_s": latency / 3, "ttft_p99_s": latency / 2, "latencies_s": lat, "ttfts_s": [x / 4 for x in lat],
    }  # fmt: skip


BENCH = {
    "task": "aria", "endpoint": "http://x", "model": "aria-ft", "requests_per_level": 20,
    "levels": [_level(1, 0.2), _level(4, 0.5)], "peak_resident_memory_bytes": 1.5e9,
    "peak_gpu_memory_bytes": None, "metrics_endpoint": True,
}  # fmt: skip


def test_report_has_plots_targets_and_inlined_images(tmp_path):
    write_json(tmp_path / "eval.json", _eval(0.9))
    write_json(tmp_path / "bench.json", BENCH)
    md = write_report(tmp_path, targets={"exact_match": 0.95, "p99_s": 0.5})
    for name in ("confusion", "latency_hist", "latency_cdf", "throughput"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert f"plots/{name}.png" in md.read_text(encoding="utf-8")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    verdict = {(t["metric"], t["source"]): t["passed"] for t in results["targets"]}
    # Seed: exact match >= 0.80 passes at 0.9; the recipe raises it to 0.95 and it fails.
    assert verdict[("pathology_exact_match", "recipe")] is False
    assert verdict[("pathology_exact_match", "seed")] is True
    assert verdict[("json_valid", "seed")] is True
    # Latency targets use the lowest concurrency level: P50 0.2 s, P99 0.39 s.
    assert verdict[("latency_p50_s", "seed")] is True
    assert verdict[("latency_p99_s", "recipe")] is True
    assert verdict[("peak_memory_gb", "seed")] is True
    assert results["measured"]["peak_memory_gb"] == pytest.approx(1.5)
    assert results["passed"] is False
    assert "latencies_s" not in json.dumps(results)  # raw samples stay in bench.json


def test_recipe_targets_choose_direction_from_the_metric_name():
    by_metric = {
        t.metric: t.op
        for t in recipe_targets(
            {"exact_match": 0.9, "p50_s": 1.0, "false_positive_rate": 0.05, "red_flag_sensitivity": 0.95}
        )
    }
    assert by_metric == {
        "pathology_exact_match": ">=",
        "latency_p50_s": "<=",
        "false_positive_rate": "<=",
        "red_flag_sensitivity": ">=",
    }


def test_unmeasured_target_is_reported_not_failed():
    checks = check_targets("aria", {"json_valid": 1.0}, None)
    by_metric = {c["metric"]: c["passed"] for c in checks}
    assert by_metric["json_valid"] is True and by_metric["latency_p50_s"] is None


def test_empty_folder_has_nothing_to_report(tmp_path):
    with pytest.raises(ConfigError, match="nothing to report"):
        write_report(tmp_path)


def _manifest(exacts: dict[str, float]) -> dict:
    """A run manifest as `medtune run` writes it: the eval step holds each model's scalar metrics."""
    models = {}
    for stage, x in exacts.items():
        scalars = {k: v for k, v in _eval(x)["metrics"].items() if isinstance(v, float | int)}
        models[stage] = {"key": "k", "model": stage, "metrics": scalars}
    steps = {"sft": {"status": "complete"}, "eval": {"status": "complete", "models": models}}
    return {
        "name": "aria",
        "recipe": {"task": "aria", "eval": {"targets": {"exact_match": 0.95}}},
        "steps": steps,
    }


def test_run_report_compares_stages(tmp_path):
    # The last model's full metrics (confusion matrix) sit beside its predictions.
    write_json(tmp_path / "eval" / "dpo" / "metrics.json", _eval(0.97)["metrics"])
    md = write_run_report(tmp_path, _manifest({"base": 0.1, "sft": 0.85, "dpo": 0.97}))
    assert md == tmp_path / "report" / "report.md"
    text = md.read_text(encoding="utf-8")
    assert "base -> sft -> dpo" in text
    for plot in ("comparison", "confusion"):
        assert (tmp_path / "report" / "plots" / f"{plot}.png").stat().st_size > 2000
    results = json.loads((tmp_path / "report" / "results.json").read_text(encoding="utf-8"))
    assert results["stages"]["dpo"]["pathology_exact_match"] == 0.97
    recipe_target = next(t for t in results["targets"] if t["source"] == "recipe")
    assert recipe_target["passed"] is True  # the last stage (dpo, 0.97) against the recipe's 0.95


def test_compare_two_runs_side_by_side(tmp_path):
    a, b = tmp_path / "runs" / "aria", tmp_path / "eval-b"
    a.mkdir(parents=True)
    write_json(a / "manifest.json", _manifest({"sft": 0.8, "dpo": 0.9}))
    write_json(b / "eval.json", _eval(0.95))
    write_json(b / "bench.json", BENCH)
    table, report = compare_runs([a, b], out_dir=tmp_path / "cmp")
    row = next(line for line in table.splitlines() if line.startswith("pathology_exact_match"))
    assert row.split()[1:] == ["0.900", "0.950", "+0.050"]
    assert "latency_p50_s" in table  # only b has latency; a shows "–"
    assert (tmp_path / "cmp" / "plots" / "comparison.png").exists() and report.exists()
    with pytest.raises(ConfigError, match="no metrics found"):
        compare_runs([a, tmp_path / "cmp" / "plots"])
