"""Load-sweep pieces that need no server: levels, percentiles, memory from Prometheus text."""

import pytest

from medtune.errors import ConfigError
from medtune.eval.bench import parse_levels, parse_memory, percentile

METRICS = """\
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 7.5e+08
# HELP medtune_requests_total Requests by status.
# TYPE medtune_requests_total counter
medtune_requests_total{status="200"} 12.0
# HELP medtune_gpu_memory_bytes GPU memory allocated.
# TYPE medtune_gpu_memory_bytes gauge
medtune_gpu_memory_bytes{device="0"} 2.0e+09
medtune_gpu_memory_bytes{device="1"} 3.0e+09
"""


def test_memory_gauges_are_read_from_prometheus_text():
    assert parse_memory(METRICS) == {
        "process_resident_memory_bytes": 7.5e8,
        "medtune_gpu_memory_bytes": 3.0e9,
    }
    assert parse_memory("# nothing here\n") == {}


def test_levels_parse_and_reject_nonsense():
    assert parse_levels("1,2,4, 8") == [1, 2, 4, 8]
    for bad in ("", "0,2", "one,two"):
        with pytest.raises(ConfigError, match="--concurrency"):
            parse_levels(bad)


def test_percentiles_interpolate():
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None


def test_sweep_at_two_concurrency_levels_against_the_server(live_server, tmp_path):
    from medtune.eval.bench import run_bench
    from medtune.eval.report import write_report
    from medtune.tasks import get_task

    result = run_bench(
        get_task("aria"), tmp_path, endpoint=live_server.base_url, model=live_server.served_name,
        api_key=live_server.api_key, levels=[1, 2], requests=6,
    )  # fmt: skip
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert lv["errors"] == 0 and len(lv["latencies_s"]) == 6 and len(lv["ttfts_s"]) == 6
        assert 0 < lv["ttft_p50_s"] <= lv["latency_p50_s"] <= lv["latency_p99_s"]
        assert lv["tokens_per_s"] > 0 and lv["requests_per_s"] > 0
    # The server's Prometheus process collector gives its resident memory.
    assert result["peak_resident_memory_bytes"] > 50e6
    write_report(tmp_path)
    for name in ("latency_hist", "latency_cdf", "throughput"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 2000


def test_sweep_with_a_wrong_key_says_so(live_server, tmp_path):
    from medtune.eval.bench import run_bench
    from medtune.tasks import get_task

    with pytest.raises(ConfigError, match="401"):
        run_bench(get_task("aria"), tmp_path, endpoint=live_server.base_url, model="aria-ft", api_key="wrong",
                  levels=[1], requests=1)  # fmt: skip


def test_gpu_memory_from_nvidia_smi_when_present(tmp_path, monkeypatch):
    import asyncio

    from medtune.eval.bench import nvidia_smi_memory

    monkeypatch.setenv("PATH", str(tmp_path))
    assert asyncio.run(nvidia_smi_memory()) is None  # no GPU driver: nothing reported
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 1024\necho 512\n")
    fake.chmod(0o755)
    assert asyncio.run(nvidia_smi_memory()) == 1536 * 1024 * 1024  # MiB on two GPUs, summed
