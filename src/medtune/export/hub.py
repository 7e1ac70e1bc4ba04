"""Push a run to the Hugging Face Hub: the model (merged or adapter-only), its GGUF files, the model card,
and the datasets with their card. Private by default; `--dry-run` lists what would go where.

    medtune export push runs/aria --dry-run                      # model + cards + GGUF files
    medtune export push runs/aria --datasets                     # the run's data + dataset card
    plan = model_plan("runs/aria"); push(plan, token=...)

Repository ids come from `--repo`, else the recipe (`export.hub.model_repo` / `dataset_repo`), else
`.env` (`MEDTUNE_HF_MODEL_REPO` / `MEDTUNE_HF_DATASET_REPO`); the token from `HF_TOKEN`. A push is one
`create_repo` (private unless asked otherwise) and one commit of every file in the plan, with
`huggingface_hub` handling large files.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi

from medtune.errors import ConfigError, ModelError
from medtune.export.gguf import human_size
from medtune.export.runs import final_model_dir, is_adapter_dir, read_manifest
from medtune.settings import get_settings

log = logging.getLogger(__name__)


@dataclass
class UploadPlan:
    repo_id: str
    repo_type: str  # "model" | "dataset"
    private: bool
    files: list[tuple[str, Path]] = field(default_factory=list)  # (path in repo, local file)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for _, p in self.files)

    def describe(self) -> str:
        lines = [f"{self.repo_type} {self.repo_id} ({'private' if self.private else 'public'}): "
                 f"{len(self.files)} files, {human_size(self.size)}"]  # fmt: skip
        lines += [f"  {name}  ({human_size(p.stat().st_size)})  <- {p}" for name, p in self.files]
        return "\n".join(lines)


def _hub_config(run_dir: Path) -> dict[str, Any]:
    return ((read_manifest(run_dir).get("recipe") or {}).get("export") or {}).get("hub") or {}


def _repo(given: str | None, run_dir: Path, kind: str) -> str:
    key = f"{kind}_repo"
    repo = given or _hub_config(run_dir).get(key) or getattr(get_settings(), f"hf_{key}")
    if not repo:
        raise ConfigError(
            f"no {kind} repository: pass --repo, or set export.hub.{key} in the recipe, "
            f"or MEDTUNE_HF_{key.upper()} in .env"
        )
    if repo.count("/") != 1:
        raise ConfigError(f"--repo {repo!r}: expected OWNER/NAME")
    return repo


def _folder_files(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    return [
        (prefix + p.relative_to(folder).as_posix(), p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


@contextlib.contextmanager
def model_plan(
    run_dir: str | Path,
    *,
    repo_id: str | None = None,
    adapter: str | Path | None = None,
    gguf_files: list[Path] | None = None,
    private: bool | None = None,
) -> Iterator[UploadPlan]:
    """The model upload of a run: its final model folder (or the adapter folder given), the model card
    and GGUF files (those given, else every .gguf under `<run>/gguf/`). Cards live in a temp folder
    that exists while the context is open."""
    from medtune.export.cards import model_card

    run_dir = Path(run_dir)
    repo_id = _repo(repo_id, run_dir, "model")
    hub = _hub_config(run_dir)
    folder = Path(adapter) if adapter else final_model_dir(run_dir)
    if adapter and not is_adapter_dir(folder):
        raise ModelError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
    if gguf_files is None:
        gguf_files = sorted((run_dir / "gguf").glob("*.gguf"))
    plan = UploadPlan(repo_id, "model", hub.get("private", True) if private is None else private)
    plan.files = [f for f in _folder_files(folder) if f[0] != "README.md"]
    plan.files += [(p.name, p) for p in gguf_files]
    with tempfile.TemporaryDirectory(prefix="medtune-card-") as tmp:
        card = Path(tmp) / "README.md"
        card.write_text(model_card(run_dir, repo_id=repo_id, gguf_files=gguf_files), encoding="utf-8")
        plan.files.append(("README.md", card))
        yield plan


@contextlib.contextmanager
def dataset_plan(
    run_dir: str | Path, *, repo_id: str | None = None, private: bool | None = None
) -> Iterator[UploadPlan]:
    """The dataset upload of a run: every dataset (sft, dpo, test...) and the merged dataset card."""
    from medtune.export.cards import dataset_bundle

    run_dir = Path(run_dir)
    repo_id = _repo(repo_id, run_dir, "dataset")
    hub = _hub_config(run_dir)
    with tempfile.TemporaryDirectory(prefix="medtune-datasets-") as tmp:
        dataset_bundle(run_dir, tmp, name=repo_id)
        plan = UploadPlan(repo_id, "dataset", hub.get("private", True) if private is None else private)
        plan.files = _folder_files(Path(tmp))
        yield plan


def push(plan: UploadPlan, *, token: str | None = None, message: str | None = None, api: Any = None) -> str:
    """Create the repository (private unless the plan says otherwise) and commit every file; the commit URL."""
    token = token or get_settings().hf_token
    if not token:
        raise ConfigError("pushing to the Hub needs a token: set HF_TOKEN in the environment or .env")
    api = api or HfApi(token=token)
    api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=plan.private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files
    ]
    info = api.create_commit(
        plan.repo_id,
        operations=operations,
        repo_type=plan.repo_type,
        commit_message=message or f"medtune: upload {len(operations)} files",
    )
    log.info("pushed %d files (%s) to %s", len(operations), human_size(plan.size), plan.repo_id)
    return str(getattr(info, "commit_url", info))
