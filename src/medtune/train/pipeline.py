"""The whole run of a recipe, step by step, into `runs/<name>/` with a manifest.

    medtune run recipes/aria.yaml [KEY=VALUE ...] [--from sft] [--resume]    # every step
    medtune train recipes/aria.yaml --stage sft [--resume]                     # data, model, one stage

    result = run_pipeline(load_recipe(path), recipe_dir=Path("recipes"))

Steps, in order:
  data   the recipe's datasets (task generation or files), validation splits, the held-out test set
         -> data/*.jsonl (`medtune.train.prepare`)
  model  the embedded model, built on the training texts when `model.base: embedded` -> base/
  pt, sft, dpo   the stages of `train.stages`, each trained on the previous one's output (TRL/PEFT, in
         `medtune.train.<stage>`); work files in train/<stage>/, the stage's model in <stage>/ (a LoRA
         adapter is merged into a standalone model unless `merge: false`)
  eval   base and every stage scored on the test set by the task pack (`medtune.eval.local`)
         -> eval/<model>/predictions.jsonl and metrics.json; base-vs-SFT-vs-DPO in the manifest

Each step's key hashes its configuration and inputs (`medtune.train.manifest`); a step whose key and
outputs are unchanged is skipped, so re-running a finished recipe does nothing and changing the DPO
settings reruns DPO and eval only. `--from STEP` reruns that step and every later one. Under
`accelerate launch` every process trains; only the main one writes data, merges, evaluates and
writes the manifest.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.config import Recipe
from medtune.errors import ConfigError
from medtune.io import atomic_dir, sha256_file, write_json, write_jsonl
from medtune.train.manifest import Manifest, step_key
from medtune.train.prepare import RunData, corpus_texts, data_plan, prepare_data, read_split

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


@dataclass
class PipelineResult:
    run_dir: Path
    manifest: Manifest
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Processes:
    """This process alone, or one of the processes `accelerate launch` started (WORLD_SIZE > 1)."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState()

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def active_stages(recipe: Recipe) -> list[str]:
    """`train.stages` without the stages switched off (`train.<stage>.enabled: false`)."""
    stages = []
    for name in recipe.train.stages:
        if recipe.stage(name).enabled:
            stages.append(name)
        else:
            log.warning("train.%s.enabled is false: stage %s is skipped", name, name)
    return stages


def step_names(recipe: Recipe) -> list[str]:
    return ["data", "model", *active_stages(recipe), "eval"]


def _check_chain(recipe: Recipe, stages: list[str]) -> None:
    """A stage followed by another must hand it a standalone model."""
    for name, following in itertools.pairwise(stages):
        cfg = recipe.stage(name)
        if cfg.method != "full" and not cfg.merge:
            raise ConfigError(
                f"train.{name}.merge: is false, but stage {following} trains on {name}'s output and needs "
                f"a standalone model: set train.{name}.merge=true or remove {following} from train.stages"
            )


def _rel(path: Path, run_dir: Path) -> str:
    """Paths in the manifest are relative to the run folder, so a run folder can be moved."""
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return str(path)


def _install(src: Path, dst: Path) -> None:
    """Move a finished model folder into its place in one step (replacing an older one)."""
    with atomic_dir(dst) as tmp:
        os.replace(src, tmp)


class _Run:
    """One invocation: the recipe, the run folder, the manifest and what to force."""

    def __init__(self, recipe: Recipe, recipe_dir: Path, force: set[str], resume: bool) -> None:
        self.recipe = recipe
        self.recipe_dir = recipe_dir
        self.run_dir = recipe.run_dir
        self.force = force
        self.resume = resume
        self.procs = _Processes()
        if self.procs.is_main:
            self.manifest = Manifest.open(self.run_dir, recipe)
        self.procs.barrier()
        if not self.procs.is_main:
            self.manifest = Manifest.load(self.run_dir)  # type: ignore[assignment]
            self.manifest.read_only = True
        self.result = PipelineResult(self.run_dir, self.manifest)

    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def fresh(self, name: str, key: str, outputs: list[Path]) -> bool:
        if name in self.force or not self.manifest.is_fresh(name, key, outputs):
            return False
        log.info("%s: up to date (key %s), skipped", name, key)
        self.manifest.skip(name)
        self.result.skipped.append(name)
        return True

    def run_step(
        self, name: str, key: str, work: Callable[[], dict[str, Any]], *, everywhere: bool = False
    ) -> None:
        """Run `work` (on the main process only unless `everywhere`) and record what it returns."""
        self.manifest.start(name, key)
        try:
            fields = work() if (everywhere or self.procs.is_main) else {}
        except BaseException as exc:
            self.manifest.fail(name, exc)
            raise
        if self.procs.is_main:
            self.manifest.complete(name, **fields)
        self.procs.barrier()
        if not self.procs.is_main:
            self.manifest.reload()
        self.result.ran.append(name)

    # -- data ----------------------------------------------------------------------------------------

    def data_step(self) -> RunData:
        plan = data_plan(self.recipe, self.recipe_dir)
        key = step_key(plan)
        record = self.manifest.step("data")
        previous = RunData.from_manifest({k: str(self.path(v)) for k, v in record.get("outputs", {}).items()})
        if self.fresh("data", key, list(previous.files().values())):
            return previous

        def work() -> dict[str, Any]:
            files = prepare_data(self.recipe, self.recipe_dir, self.path("data"))
            hashes = {name: sha256_file(p) for name, p in files.files().items()}
            self.manifest.data["data_files"] = {
                name: {"path": _rel(p, self.run_dir), "sha256": hashes[name]}
                for name, p in files.files().items()
            }
            return {
                "outputs": {name: _rel(p, self.run_dir) for name, p in files.files().items()},
                "hashes": hashes,
                "plan": plan,
            }

        self.run_step("data", key, work)
        outputs = self.manifest.step("data")["outputs"]
        return RunData.from_manifest({k: str(self.path(v)) for k, v in outputs.items()})

    def file_hash(self, name: str) -> str | None:
        return self.manifest.step("data").get("hashes", {}).get(name)

    # -- model ---------------------------------------------------------------------------------------

    def model_step(self, files: RunData) -> tuple[str, str]:
        """(base model path or hub id, its key)."""
        model = self.recipe.model
        if model.base != EMBEDDED:
            key = step_key(model.base, model.revision)
            if not self.fresh("model", key, []):
                self.run_step("model", key, lambda: {"output": model.base, "embedded": False})
            return model.base, key
        train_hashes = sorted(
            self.file_hash(n) or "" for n in files.files() if n.endswith((".train", ".validation"))
        )
        key = step_key(model.embedded.model_dump(), model.chat_template, self.recipe.seed, train_hashes)
        out = self.path("base")
        if self.fresh("model", key, [out]):
            return str(out), key

        def work() -> dict[str, Any]:
            from medtune.train.models import build_embedded_model, embedded_dimensions

            template = model.chat_template or "chatml"
            texts = corpus_texts(files, template)
            build_embedded_model(texts, model.embedded, out, chat_template=template, seed=self.recipe.seed)
            return {
                "output": "base",
                "embedded": True,
                "dimensions": embedded_dimensions(model.embedded),
                "corpus_texts": len(texts),
            }

        self.run_step("model", key, work)
        return str(out), key

    # -- training stages -----------------------------------------------------------------------------

    def stage_key(self, stage: str, input_key: str) -> str:
        cfg = self.recipe.stage(stage)  # type: ignore[arg-type]
        return step_key(
            stage,
            cfg.model_dump(mode="json"),
            self.recipe.model.model_dump(mode="json"),
            self.recipe.seed,
            input_key,
            self.file_hash(f"{stage}.train"),
            self.file_hash(f"{stage}.validation"),
        )

    def stage_step(self, stage: str, input_model: str, input_key: str, files: RunData) -> tuple[str, str]:
        """Train one stage on `input_model`; (its output model path, its key)."""
        recipe = self.recipe
        cfg = recipe.stage(stage)  # type: ignore[arg-type]
        seed = cfg.seed if cfg.seed is not None else recipe.seed
        key = self.stage_key(stage, input_key)
        out = self.path(stage)
        if self.fresh(stage, key, [out]):
            return str(out), key
        work_dir = self.path(f"train/{stage}")

        def work() -> dict[str, Any]:
            train = read_split(files.train[stage]) or []
            validation = read_split(files.validation.get(stage))
            result = _trainer(stage)(
                input_model, train, validation, cfg, recipe.model, work_dir, seed=seed, resume=self.resume
            )
            merged = False
            if self.procs.is_main:
                if result.is_adapter and cfg.merge:
                    from medtune.train.merge import merge_adapter

                    merge_adapter(result.output_dir, out, base_model=input_model)
                    merged = True
                else:
                    _install(result.output_dir, out)
            return {
                "output": stage,
                "input": _rel(Path(input_model), self.run_dir),
                "method": cfg.method,
                "is_adapter": result.is_adapter and not merged,
                "merged": merged,
                "metrics": result.metrics,
                "loss_curve": _rel(result.loss_curve, self.run_dir) if result.loss_curve else None,
                "work_dir": _rel(work_dir, self.run_dir),
                "train_records": len(train),
                "validation_records": len(validation or []),
            }

        self.run_step(stage, key, work, everywhere=True)
        return str(out), key

    # -- evaluation ----------------------------------------------------------------------------------

    def eval_step(self, models: list[tuple[str, str, str]], files: RunData) -> None:
        """Score each (name, path, key) model on the test set with the task pack."""
        recipe = self.recipe
        reasons = {
            "no task pack to score with": not recipe.task,
            "eval.enabled is false": not recipe.eval.enabled,
            "no test set": files.test is None,
        }
        if any(reasons.values()):
            log.info("eval: skipped (%s)", next(r for r, skip in reasons.items() if skip))
            return
        if not self.procs.is_main:
            return
        hub = [path for _, path, _ in models if not Path(path).exists()]
        if hub:
            log.info("eval: %s is not a local model folder and is not evaluated", ", ".join(hub))
            models = [m for m in models if m[1] not in hub]
        batch = recipe.serve.max_batch_size
        test_hash = self.file_hash("test")
        keys = {
            name: step_key("eval", recipe.task, test_hash, model_key, batch) for name, _, model_key in models
        }
        key = step_key(sorted(keys.items()))
        outputs = [self.path(f"eval/{name}/metrics.json") for name in keys]
        if self.fresh("eval", key, outputs):
            return
        previous = self.manifest.step("eval").get("models", {})
        self.manifest.start("eval", key)
        self.manifest.steps["eval"]["models"] = results = {}
        try:
            examples = read_split(files.test, prompt_only=True) or []
            for name, path, _ in models:
                old = previous.get(name, {})
                if (
                    "eval" not in self.force
                    and old.get("key") == keys[name]
                    and self.path(f"eval/{name}/metrics.json").is_file()
                ):
                    log.info("eval %s: up to date, skipped", name)
                    results[name] = old
                else:
                    results[name] = self._evaluate(name, path, keys[name], examples)
                self.manifest.save()
        except BaseException as exc:
            self.manifest.fail("eval", exc)
            raise
        self.manifest.complete("eval", models=results, test_cases=len(examples), task=recipe.task)
        self.report(results)
        self.result.ran.append("eval")

    def report(self, results: dict[str, Any]) -> None:
        """Targets of the last model (the seed's and the recipe's) and the run report (report/)."""
        from medtune.eval.report import check_targets, write_run_report

        final = results[list(results)[-1]]["metrics"] if results else {}
        checked = check_targets(self.recipe.task, final, self.recipe.eval.targets)
        self.manifest.data["targets"] = [t for t in checked if t["passed"] is not None]
        self.manifest.steps["eval"]["report"] = _rel(
            write_run_report(self.run_dir, self.manifest), self.run_dir
        )
        self.manifest.save()

    def _evaluate(self, name: str, path: str, key: str, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from medtune.eval.local import evaluate_model
        from medtune.tasks import get_task

        log.info("eval %s: %d test cases", name, len(examples))
        task = get_task(self.recipe.task)  # type: ignore[arg-type]
        evaluated = evaluate_model(
            path, task, examples, constrained=True, batch_size=self.recipe.serve.max_batch_size
        )
        out = self.path(f"eval/{name}")
        reasons = evaluated.finish_reasons or [None] * len(examples)
        rows = [
            {"label": ex.get("label"), "prediction": pred, "finish_reason": reason}
            for ex, pred, reason in zip(examples, evaluated.predictions, reasons, strict=True)
        ]
        write_jsonl(out / "predictions.jsonl", rows)
        write_json(out / "metrics.json", evaluated.metrics)
        return {
            "key": key,
            "model": _rel(Path(path), self.run_dir),
            "metrics": _scalars(evaluated.metrics),
            "predictions": _rel(out / "predictions.jsonl", self.run_dir),
        }


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a metrics dict (nested tables such as the confusion matrix stay in metrics.json)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _trainer(stage: str) -> Callable[..., Any]:
    if stage == "sft":
        from medtune.train.sft import train_sft

        return train_sft
    if stage == "dpo":
        from medtune.train.dpo import train_dpo

        return train_dpo
    from medtune.train.pt import train_pt

    return train_pt


def run_pipeline(
    recipe: Recipe,
    *,
    recipe_dir: Path = Path("."),
    from_step: str | None = None,
    stage: str | None = None,
    resume: bool = False,
) -> PipelineResult:
    """Run the recipe (every step, or with `stage` only data, model and that stage) into `runs/<name>/`.

    `recipe_dir` is where relative dataset paths are looked up after the current directory.
    `from_step` reruns that step and every later one even if up to date. `resume` continues an
    interrupted stage from its newest complete checkpoint.
    """
    names = step_names(recipe)
    stages = names[2:-1]
    if from_step is not None and from_step not in names:
        raise ConfigError(
            f"--from {from_step}: unknown step; the steps of this recipe are {', '.join(names)}"
        )
    if stage is not None and stage not in stages:
        raise ConfigError(
            f"--stage {stage}: not a stage of this recipe (train.stages: {', '.join(stages) or 'none'})"
        )
    _check_chain(recipe, stages)
    if stage is not None:
        _require_trained_before(recipe, stages[: stages.index(stage)], stage)
    force = set(names[names.index(from_step) :]) if from_step else set()
    if stage is not None:
        force.add(stage)
    run = _Run(recipe, recipe_dir, force, resume)
    try:
        files = run.data_step()
        model_path, model_key = run.model_step(files)
        models = [("base", model_path, model_key)]
        for name in stages:
            if stage is not None and name == stage:
                run.stage_step(name, model_path, model_key, files)
                break
            if stage is not None:
                model_path, model_key = _require_fresh_stage(run, name, model_key, stage)
                continue
            model_path, model_key = run.stage_step(name, model_path, model_key, files)
            models.append((name, model_path, model_key))
        if stage is None:
            run.eval_step(models, files)
    except BaseException as exc:
        if run.procs.is_main:
            run.manifest.abort(exc)
        raise
    if run.procs.is_main:
        run.manifest.finish("complete")
    return run.result


def _require_trained_before(recipe: Recipe, previous: list[str], target: str) -> None:
    """Before any work: `train --stage dpo` needs the earlier stages trained (freshness is checked later)."""
    saved = Manifest.load(recipe.run_dir)
    for name in previous:
        if (
            saved is None
            or saved.step(name).get("status") != "complete"
            or not (recipe.run_dir / name).exists()
        ):
            raise ConfigError(
                f"--stage {target}: trains on the output of stage {name}, which is not trained yet in "
                f"{recipe.run_dir}; run `medtune train RECIPE --stage {name}` first, or `medtune run RECIPE`"
            )


def _require_fresh_stage(run: _Run, name: str, input_key: str, target: str) -> tuple[str, str]:
    """`train --stage dpo` trains on the sft output: it must exist and match the recipe as it is now."""
    key = run.stage_key(name, input_key)
    out = run.path(name)
    if run.manifest.is_fresh(name, key, [out]):
        return str(out), key
    raise ConfigError(
        f"--stage {target}: trains on the output of stage {name}, which is out of date in {run.run_dir} "
        "(the recipe or its inputs changed since it was trained); "
        f"run `medtune train RECIPE --stage {name}` first, or `medtune run RECIPE`"
    )
