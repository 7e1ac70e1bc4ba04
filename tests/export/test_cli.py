"""`medtune export ...` end to end on a copy of a tiny run: GGUF files in the run, an Ollama folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medtune.cli import main


@pytest.fixture
def run_copy(tiny_run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run_dir, tmp_path / "aria"))


def test_export_gguf_of_a_run_writes_into_its_gguf_folder(run_copy: Path, capsys):
    pytest.importorskip("llama_cpp")
    assert main(["export", "gguf", str(run_copy), "--quant", "q8_0", "--quant", "f16"]) == 0
    printed = capsys.readouterr().out
    for quant in ("q8_0", "f16"):
        path = run_copy / "gguf" / f"aria-dpo-{quant}.gguf"
        assert path.is_file() and str(path) in printed
    assert not list(run_copy.glob("gguf/.*"))  # no temporary file left behind


def test_export_ollama_of_a_run_uses_the_recipe_system_prompt(run_copy: Path, tmp_path: Path, capsys):
    pytest.importorskip("llama_cpp")
    from medtune.tasks import get_task

    out = tmp_path / "ollama"
    assert main(["export", "ollama", str(run_copy), "--out", str(out), "--quant", "q8_0"]) == 0
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./aria-q8_0.gguf" in modelfile and (out / "aria-q8_0.gguf").is_file()
    assert f'SYSTEM """{get_task("aria").system_prompt}"""' in modelfile
    assert "PARAMETER temperature 0" in modelfile
    assert capsys.readouterr().out.strip().endswith(f"ollama create aria -f {out / 'Modelfile'}")


def test_export_errors_are_one_line_without_traceback(tmp_path: Path, capsys):
    assert main(["export", "gguf", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtune: error:") and "no such file or folder" in err and "Traceback" not in err
