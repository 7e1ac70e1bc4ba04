"""Export fixtures: the tiny embedded model converted to GGUF once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ggufs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"f16": path, "q8_0": path} for `tiny_model_dir` (llama-cpp-python required)."""
    pytest.importorskip("llama_cpp")
    from medtune.export.gguf import export_ggufs

    out = tmp_path_factory.mktemp("gguf")
    return {f.quant: f.path for f in export_ggufs(tiny_model_dir, out, ["f16", "q8_0"], name="tiny")}
