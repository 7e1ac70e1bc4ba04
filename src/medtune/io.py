"""Atomic file and directory writes: output is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_beside(
        target, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    )
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _new_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """A new hidden path next to `target`, made by `create` (which raises FileExistsError if taken).

    Files are created 0666 and directories 0777, less the umask, which the kernel applies, as for a plain
    open() or mkdir (mkstemp and mkdtemp give 0600 and 0700; reading the umask means setting it, which
    is not safe with other threads)."""
    while True:
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write `obj` as UTF-8 JSON (non-ASCII kept as is) atomically."""
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """Write records as JSON lines atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` as a whole."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_beside(target, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
