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
