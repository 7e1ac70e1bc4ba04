"""Recipes: one YAML file describes a whole run (data, base model, stages, export, serve, eval).

    recipe = load_recipe("recipes/aria.yaml", overrides=["train.sft.lora.r=16"])
    problems = validate_recipe_file("recipes/aria.yaml")   # every problem at once, [] when fine

The pydantic models below are at once the YAML schema, the override targets and the reference
documentation (`docs/` renders them). Unknown keys are errors with a "did you mean". Settings that
belong to a machine rather than a recipe (port, API key, tokens) live in `medtune.settings`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.errors import ConfigError

Method = Literal["full", "lora", "qlora"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
StageName = Literal["pt", "sft", "dpo"]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are rejected, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the head)."
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class QLoraConfig(Strict):
    """4-bit quantisation of the frozen base (bitsandbytes; needs CUDA)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class StageConfig(Strict):
    """One training stage (pt, sft or dpo). Defaults suit the embedded CPU model."""

    enabled: bool = True
    data: str | None = Field(None, description="Dataset file; default: the file the pipeline generated.")
    format: str = Field("auto", description="Dataset format, or 'auto' to detect it.")
    method: Method = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QLoraConfig = Field(default_factory=QLoraConfig)
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: use num_epochs).")
    num_epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit", "sgd", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Precision = Field("auto", description="auto: bf16 on a GPU that supports it, else fp32.")
    gradient_checkpointing: bool = False
    max_length: int = Field(512, ge=8, description="Longest tokenised example; longer ones are truncated.")
    packing: bool = False
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1, description="Evaluations without improvement.")
    seed: int | None = Field(None, description="Default: the recipe's seed.")
    # DPO only.
    beta: float = Field(0.1, gt=0, description="DPO temperature (dpo stage only).")
    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL DPO loss type (dpo stage only); a list combines several, e.g. [sigmoid, sft]: "
        "DPO plus the chosen answers' NLL (RPO), which keeps the SFT model's exact answers.",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss_type entry (default: 1 each)."
    )

    @property
    def loss_types(self) -> list[str]:
        """`loss_type` as a list (one entry when a single loss is given)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _loss_weights_match(self) -> StageConfig:
        types = self.loss_types
        if not types:
            raise ValueError("loss_type: give at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights: {len(self.loss_weights)} weight(s) for {len(types)} loss type(s) {types}"
            )
        return self

    merge: bool = Field(True, description="Merge LoRA into the base after this stage.")


class TrainConfig(Strict):
    stages: list[StageName] = Field(default_factory=lambda: ["sft", "dpo"])
    pt: StageConfig = Field(default_factory=lambda: StageConfig(enabled=False))
    sft: StageConfig = Field(default_factory=StageConfig)
    dpo: StageConfig = Field(default_factory=lambda: StageConfig(learning_rate=2e-5, beta=0.2))


class EmbeddedModelConfig(Strict):
    """The small Llama-architecture model medtune builds and trains itself (`base_model: embedded`)."""

    size: Literal["tiny", "small", "base"] = "small"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = Field(
        None,
        ge=1,
        description="Key/value heads (grouped-query attention: query heads share them in groups). Fewer "
        "heads shrink the KV cache a batched decoding step reads. Default: one per query head.",
    )
    intermediate_size: int | None = None
    vocab_size: int = Field(640, ge=64, description="Tokenizer vocabulary trained on the corpus.")
    split_digits: bool = Field(
        True,
        description="Tokenise numbers digit by digit. False lets frequent numbers ('1.35', '+12.4%)') become "
        "tokens of their own: fewer tokens per example, and a small model compares them faster.",
    )
    max_position_embeddings: int = Field(1024, ge=64)
    symbols: list[str] = Field(
        default_factory=list,
        description="Strings the tokenizer keeps as one token each wherever they appear (domain terms such "
        "as a task's field names): shorter sequences, and one token to attend to per term.",
    )

    @field_validator("symbols")
    @classmethod
    def _symbols_are_distinct_words(cls, value: list[str]) -> list[str]:
        for i, symbol in enumerate(value):
            if not symbol.strip() or symbol != symbol.strip():
                raise ValueError(
                    f"symbols[{i}] {symbol!r}: expected a non-empty term without surrounding spaces"
                )
        if len(set(value)) != len(value):
            raise ValueError("symbols: each term once")
        return value


class ModelConfig(Strict):
    base: str = Field("embedded", description="'embedded', a hub id or a local path.")
    kind: Literal["causal", "seq2seq", "auto"] = "auto"
    embedded: EmbeddedModelConfig = Field(default_factory=EmbeddedModelConfig)
    chat_template: str | None = Field(
        None, description="Named template (chatml, llama3, gemma, ...) when the tokenizer has none."
    )
    system_prompt: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None


class GenerateConfig(Strict):
    """Synthetic data from the task pack (used when `task` is set)."""

    sft: int = Field(1500, ge=0)
    dpo: int = Field(420, ge=0)
    test: int = Field(300, ge=0)
    seed: int = 1
    test_seed: int = 2
    hard_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Training data only (SFT and DPO): how often the task draws its hardest cases (aria: a "
        "second, weaker signal firing); None: the task's default. The test set always uses the default.",
    )


class DataConfig(Strict):
    generate: GenerateConfig | None = Field(default_factory=GenerateConfig)
    pt: str | None = None
    sft: str | None = None
    dpo: str | None = None
    test: str | None = None


class GgufConfig(Strict):
    quantizations: list[str] = Field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])


class OllamaConfig(Strict):
    temperature: float = 0.0
    num_ctx: int | None = None


class HubConfig(Strict):
    model_repo: str | None = None
    dataset_repo: str | None = None
    private: bool = True


class ExportConfig(Strict):
    gguf: GgufConfig = Field(default_factory=GgufConfig)
    ollama: OllamaConfig = Field(default_factory=OllamaConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    license: str = "apache-2.0"
    language: list[str] = Field(default_factory=lambda: ["fr"])


class ServeConfig(Strict):
    engine: Literal["transformers", "llamacpp", "vllm"] = "transformers"
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> adapter folder.")
    max_batch_size: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    request_timeout: float = Field(60.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = None
    dtype: str = "auto"


class EvalConfig(Strict):
    enabled: bool = True
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    requests_per_level: int = Field(64, ge=1)
    targets: dict[str, float] = Field(
        default_factory=dict, description="metric -> threshold, e.g. exact_match: 0.95, p50_s: 1.5."
    )


class Recipe(Strict):
    """A whole run. `runs/<name>/` receives every stage's output and a manifest."""

    name: str = Field(..., min_length=1)
    task: str | None = Field(None, description="Clinical task pack (aria, headache) or none.")
    seed: int = 42
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        if len(set(self.train.stages)) != len(self.train.stages):
            raise ValueError(f"train.stages lists a stage twice: {self.train.stages}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def stage(self, name: StageName) -> StageConfig:
        return getattr(self.train, name)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, validation


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML: numbers, booleans, lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.sft.lora.r=16")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b.c=value` in a nested dict (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _known_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at `path` inside `model` (for 'did you mean')."""
    current: Any = model
    for part in path:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        # Unwrap Optional[Section].
        for arg in getattr(ann, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                ann = arg
        current = ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_validation_errors(exc: ValidationError, model: type[BaseModel] = Recipe) -> list[str]:
    """Turn pydantic errors into `key.path: what was expected, what was found` lines."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(recipe)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            problems.append(f"{key}: unknown key{hint}")
        elif err["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            found = err.get("input")
            shown = repr(found) if not isinstance(found, dict) else "a section"
            problems.append(f"{key}: {err['msg']} (found {shown})")
    return problems


def read_recipe_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe is a mapping of sections, found {type(data).__name__}")
    return data


def _resolve_paths(recipe: Recipe, base_dir: Path) -> list[str]:
    """Check that every dataset file the recipe names exists. Relative paths are taken from the
    current directory first, then from the recipe's folder."""
    problems = []

    def check(key: str, value: str | None) -> None:
        if value is None:
            return
        if not Path(value).exists() and not (base_dir / value).exists():
            problems.append(f"{key}: file not found: {value}")

    for name in ("pt", "sft", "dpo", "test"):
        check(f"data.{name}", getattr(recipe.data, name))
    for stage in ("pt", "sft", "dpo"):
        check(f"train.{stage}.data", recipe.stage(stage).data)
    for name, adapter in recipe.serve.adapters.items():
        check(f"serve.adapters.{name}", adapter)
    base = recipe.model.base
    looks_local = base.startswith((".", "/", "~")) or base.endswith((".gguf", ".safetensors"))
    if base != "embedded" and looks_local and not Path(base).expanduser().exists():
        problems.append(f"model.base: local model path not found: {base}")
    return problems


def _semantic_problems(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.task is not None:
        from medtune.tasks import available_tasks

        if recipe.task not in available_tasks():
            close = difflib.get_close_matches(recipe.task, available_tasks(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"task: unknown task {recipe.task!r} (known: {', '.join(available_tasks())}){hint}"
            )
    for stage in recipe.train.stages:
        cfg = recipe.stage(stage)
        has_data = cfg.data or getattr(recipe.data, stage) or (recipe.task and recipe.data.generate)
        if stage != "pt" and not has_data:
            problems.append(
                f"train.{stage}: no dataset: set train.{stage}.data or data.{stage}, or a task with data.generate"
            )
        if stage == "pt" and not (cfg.data or recipe.data.pt):
            problems.append("train.pt: continued pretraining needs raw text: set data.pt or train.pt.data")
    if recipe.model.base == "embedded":
        for stage in recipe.train.stages:
            if recipe.stage(stage).method == "qlora":
                problems.append(
                    f"train.{stage}.method: qlora quantises a pretrained base; the embedded model is trained in full or lora"
                )
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; raise ConfigError listing every problem."""
    problems = validate_recipe_file(path, overrides)
    if problems:
        raise ConfigError(f"{path}: the recipe has {len(problems)} problem(s)", problems)
    return Recipe.model_validate(apply_overrides(read_recipe_dict(path), overrides or []))


def validate_recipe_file(path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """Every problem of a recipe (schema, unknown keys, missing files, inconsistencies); [] if none."""
    data = apply_overrides(read_recipe_dict(path), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        return format_validation_errors(exc)
    return _resolve_paths(recipe, Path(path).parent) + _semantic_problems(recipe)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (for manifests)."""
    return recipe.model_dump(mode="json")
