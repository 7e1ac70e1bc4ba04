"""The pipeline's data step: a recipe's datasets, split and written as canonical JSONL in `runs/<name>/data/`.

    plan = data_plan(recipe, recipe_dir)            # what the step reads (for its key)
    files = prepare_data(recipe, recipe_dir, run_dir / "data")
    train = read_split(files.train["sft"]); test = read_split(files.test, prompt_only=True)

For each stage of `train.stages`, the records come from the stage's file (`train.<stage>.data`, else
`data.<stage>`, read by `medtune.data` in `train.<stage>.format`) or, for a recipe with a task pack and
`data.generate`, from the task's seeded generator. `train.<stage>.validation_split` of them is held out
(stratified by label when the records have one). The test set is `data.test` or, with a task, `data.generate.test`
cases drawn with `data.generate.test_seed`: a seed the training data never uses. `model.system_prompt` is
added to every conversation that has no system turn (the seed's Doctis prompt, for instance).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.config import Recipe
from medtune.data.files import load_records
from medtune.data.split import split_records
from medtune.errors import ConfigError, DataError
from medtune.io import sha256_file, write_jsonl

log = logging.getLogger(__name__)

# The canonical record kind each stage trains on.
STAGE_KINDS = {"pt": "text", "sft": "conversation", "dpo": "preference"}


@dataclass
class RunData:
    """The files of a run's data step: per stage a train file and an optional validation file."""

    train: dict[str, Path] = field(default_factory=dict)
    validation: dict[str, Path] = field(default_factory=dict)
    test: Path | None = None

    def files(self) -> dict[str, Path]:
        named = {f"{s}.train": p for s, p in self.train.items()}
        named |= {f"{s}.validation": p for s, p in self.validation.items()}
        if self.test is not None:
            named["test"] = self.test
        return named

    @classmethod
    def from_manifest(cls, outputs: dict[str, str]) -> RunData:
        data = cls()
        for name, path in outputs.items():
            if name == "test":
                data.test = Path(path)
            else:
                stage, _, part = name.partition(".")
                (data.train if part == "train" else data.validation)[stage] = Path(path)
        return data


def resolve_data_path(value: str, recipe_dir: Path, key: str) -> Path:
    """A recipe's dataset path: as given (from the current directory), else beside the recipe."""
    for candidate in (Path(value), recipe_dir / value):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{key}: file not found: {value} (looked in . and {recipe_dir})")


def stage_source(recipe: Recipe, stage: str) -> tuple[str, str | None]:
    """(recipe key, path) of a stage's user dataset, or (key, None) when the task generates it."""
    cfg = recipe.stage(stage)  # type: ignore[arg-type]
    if cfg.data:
        return f"train.{stage}.data", cfg.data
    return f"data.{stage}", getattr(recipe.data, stage)


def data_plan(recipe: Recipe, recipe_dir: Path) -> dict[str, Any]:
    """Everything the data step's output depends on: sources (with file hashes) and split settings."""
    plan: dict[str, Any] = {
        "task": recipe.task,
        "seed": recipe.seed,
        "system_prompt": recipe.model.system_prompt,
        "stages": {},
    }
    generate = recipe.data.generate if recipe.task else None
    for stage in recipe.train.stages:
        key, path = stage_source(recipe, stage)
        cfg = recipe.stage(stage)
        entry: dict[str, Any] = {"validation_split": cfg.validation_split, "format": cfg.format}
        if path:
            entry["file"] = {"path": path, "sha256": sha256_file(resolve_data_path(path, recipe_dir, key))}
        elif generate is not None and stage != "pt":
            entry["generate"] = {"n": getattr(generate, stage), "seed": generate.seed}
        else:
            raise ConfigError(f"train.{stage}: no dataset: set {key} (or a task with data.generate)")
        plan["stages"][stage] = entry
    if recipe.data.test:
        test_file = resolve_data_path(recipe.data.test, recipe_dir, "data.test")
        plan["test"] = {"file": {"path": recipe.data.test, "sha256": sha256_file(test_file)}}
    elif generate is not None and generate.test > 0:
        plan["test"] = {"generate": {"n": generate.test, "seed": generate.test_seed}}
    return plan


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def add_system_prompt(records: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Conversations and preference prompts without a system turn get `system` first."""
    if not system:
        return records
    out = []
    for record in records:
        record = dict(record)
        for key in ("messages", "prompt"):
            if isinstance(record.get(key), list):
                record[key] = _with_system(record[key], system)
        out.append(record)
    return out


def _stage_records(recipe: Recipe, recipe_dir: Path, stage: str) -> list[dict[str, Any]]:
    key, path = stage_source(recipe, stage)
    kind = STAGE_KINDS[stage]
    if path:
        cfg = recipe.stage(stage)  # type: ignore[arg-type]
        return load_records(resolve_data_path(path, recipe_dir, key), cfg.format, kind=kind)
    from medtune.tasks import get_task

    task, generate = get_task(recipe.task), recipe.data.generate  # type: ignore[arg-type]
    n = getattr(generate, stage)
    if n <= 0:
        raise ConfigError(
            f"data.generate.{stage}: is {n}, but train.stages runs {stage}: generate > 0 examples"
        )
    hard = generate.hard_share
    records = (
        task.generate_sft(n, seed=generate.seed, hard_share=hard)
        if stage == "sft"
        else task.generate_dpo(n, seed=generate.seed, hard_share=hard)
    )
    log.info("generated %d %s %s examples (seed %d)", len(records), recipe.task, stage, generate.seed)
    return records


def _test_records(recipe: Recipe, recipe_dir: Path) -> list[dict[str, Any]] | None:
    if recipe.data.test:
        path = resolve_data_path(recipe.data.test, recipe_dir, "data.test")
        return load_records(path, "auto", kind="conversation", prompt_only=True)
    generate = recipe.data.generate
    if recipe.task and generate is not None and generate.test > 0:
        from medtune.tasks import get_task

        if generate.test_seed == generate.seed:
            log.warning("data.generate.test_seed equals data.generate.seed: the test set is not held out")
        return get_task(recipe.task).generate_test(generate.test, seed=generate.test_seed)
    return None


def prepare_data(recipe: Recipe, recipe_dir: Path, data_dir: Path) -> RunData:
    """Read or generate every stage's records, split off validation sets, write them to `data_dir`."""
    data_dir = Path(data_dir)
    out = RunData()
    system = recipe.model.system_prompt
    for stage in recipe.train.stages:
        cfg = recipe.stage(stage)
        records = add_system_prompt(_stage_records(recipe, recipe_dir, stage), system)
        parts = {"train": records, "validation": []}
        if cfg.validation_split > 0:
            parts = split_records(records, val=cfg.validation_split, test=0.0, seed=recipe.seed)
            if not parts["validation"]:
                log.warning("%s: %d records are too few for a %.0f%% validation split", stage, len(records),
                            100 * cfg.validation_split)  # fmt: skip
        if not parts["train"]:
            raise DataError(f"{stage}: no training records left after the validation split")
        out.train[stage] = write_jsonl(data_dir / f"{stage}.train.jsonl", parts["train"])
        if parts["validation"]:
            out.validation[stage] = write_jsonl(data_dir / f"{stage}.validation.jsonl", parts["validation"])
        log.info("%s: %d train / %d validation records", stage, len(parts["train"]), len(parts["validation"]))
    test = _test_records(recipe, recipe_dir)
    if test:
        out.test = write_jsonl(data_dir / "test.jsonl", add_system_prompt(test, system))
    return out


def read_split(path: Path | None, *, prompt_only: bool = False) -> list[dict[str, Any]] | None:
    """Records of a file written by `prepare_data` (None when there is no such file)."""
    if path is None:
        return None
    return load_records(path, "auto", prompt_only=prompt_only)


def corpus_texts(files: RunData, chat_template: str = "chatml") -> list[str]:
    """The training texts rendered as the model will see them (conversations through the chat template,
    raw texts as they are): the embedded model's tokenizer corpus, so role names and markers get tokens
    of their own. Validation files are included (training-side data); the test set never is."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from medtune.data.templates import get_template

    template = chat_template if "{%" in chat_template else get_template(chat_template)
    texts: list[str] = []
    chats: list[list[dict[str, Any]]] = []
    for path in [*files.train.values(), *files.validation.values()]:
        for record in read_split(path) or []:
            if "text" in record:
                texts.append(record["text"])
            elif "messages" in record:
                chats.append(record["messages"])
            else:
                chats += [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]
    if chats:
        rendered, _ = render_jinja_template(chats, chat_template=template, bos_token="", eos_token="")
        texts += rendered
    return texts
