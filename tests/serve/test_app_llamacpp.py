"""The serving API tests (test_app.py) against the llamacpp engine: same server, a GGUF of the same model.

Every test of test_app.py runs here too, with `live_server` serving an F16 GGUF export of
`served_model_dir` through `medtune serve --engine llamacpp`, except those about LoRA adapters (the
llamacpp engine serves one fused model and refuses `--adapter` with a clear error).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import httpx
import pytest

from . import test_app

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.gguf

# test_app's tests, minus those that need adapters (found by reading each test, so new ones follow).
for _name, _test in vars(test_app).items():
    if _name.startswith("test_") and "adapter" not in inspect.getsource(_test):
        globals()[_name] = _test


@pytest.fixture(scope="module")
def live_server(server_factory, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from medtune.export.gguf import export_gguf

    gguf = export_gguf(served_model_dir, tmp_path_factory.mktemp("served_gguf") / "served-f16.gguf", "f16")
    return server_factory(gguf.path, engine="llamacpp")


def test_models_lists_the_served_model(live_server):
    assert [m.id for m in live_server.client().models.list().data] == ["aria-ft"]
    health = httpx.get(f"{live_server.base_url}/health", timeout=10).json()
    assert health["engine"] == "llamacpp" and health["loaded"] is True
