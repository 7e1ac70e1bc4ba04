"""Hub push: the upload plan (--dry-run) and the calls made, with a recording stand-in for HfApi."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune.cli import main
from medtune.errors import ConfigError
from medtune.export.hub import dataset_plan, model_plan, push


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_commit(self, *args, **kwargs):
        self.calls.append(("create_commit", args, kwargs))
        return "https://huggingface.co/commit/abc"


def test_dry_run_lists_model_card_and_gguf_files(tiny_run_dir: Path, capsys, monkeypatch):
    monkeypatch.setattr("medtune.export.hub.HfApi", None)  # any network use would fail loudly
    gguf = tiny_run_dir.parent / "extra-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    try:
        assert main(["export", "push", str(tiny_run_dir), "--dry-run", "--gguf", str(gguf)]) == 0
    finally:
        gguf.unlink()
    out = capsys.readouterr().out
    assert out.startswith("would upload model medtune-test/aria-ft-dpo (private)")
    listed = {line.split()[0] for line in out.splitlines()[1:]}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "extra-q8_0.gguf"} <= listed


def test_push_creates_a_private_repo_and_commits_every_planned_file(tiny_run_dir: Path):
    api = RecordingApi()
    with model_plan(tiny_run_dir) as plan:
        names = [name for name, _ in plan.files]
        push(plan, token="hf_test", api=api)
    (kind, args, kwargs), (commit, cargs, ckwargs) = api.calls
    assert kind == "create_repo" and args == ("medtune-test/aria-ft-dpo",)
    assert kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    assert commit == "create_commit" and cargs == ("medtune-test/aria-ft-dpo",)
    assert [op.path_in_repo for op in ckwargs["operations"]] == names


def test_dataset_plan_holds_each_dataset_and_the_card(tiny_run_dir: Path):
    with dataset_plan(tiny_run_dir, repo_id="me/aria-data", private=False) as plan:
        names = {name for name, _ in plan.files}
        assert plan.repo_type == "dataset" and not plan.private
        assert {
            "README.md",
            "sft/train.jsonl",
            "sft/validation.jsonl",
            "dpo/train.jsonl",
            "test/test.jsonl",
        } <= names
        assert "me/aria-data" in (dict(plan.files)["README.md"]).read_text(encoding="utf-8")


def test_push_without_a_token_or_repo_says_what_to_set(tiny_run_dir: Path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("MEDTUNE_HF_TOKEN", raising=False)
    monkeypatch.chdir(tiny_run_dir)  # no .env here
    with model_plan(tiny_run_dir) as plan, pytest.raises(ConfigError, match="HF_TOKEN"):
        push(plan, api=RecordingApi())
    with (
        pytest.raises(ConfigError, match="expected OWNER/NAME"),
        model_plan(tiny_run_dir, repo_id="no-owner"),
    ):
        pass
