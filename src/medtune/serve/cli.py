"""`medtune serve` (an OpenAI-compatible server) and `medtune health` (is a server up?).

    medtune serve --model runs/aria --served-name aria-ft --port 8001 --api-key secret \\
                  --adapter derm=adapters/derm --adapter radio=adapters/radio
    medtune serve --engine vllm --model runs/aria/dpo --quantization awq      # GPU: vLLM's own server
    medtune health --url http://127.0.0.1:8001

Every option also comes from the environment or `.env` (MEDTUNE_PORT, MEDTUNE_API_KEY,
MEDTUNE_MAX_BATCH_SIZE, ...); a command-line option wins. `--model` takes a model folder or a run
folder (runs/aria: its newest merged stage, dpo then sft then pt). `--recipe recipes/aria.yaml`
takes the run folder and the recipe's `serve:` section (engine, adapters, batch and queue sizes,
timeout, ...) as defaults. SIGTERM stops taking requests and lets the ones in flight finish for
`--grace-period` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from medtune.errors import ConfigError, ModelError
from medtune.settings import Settings

log = logging.getLogger(__name__)

STAGES_NEWEST_FIRST = ("dpo", "sft", "pt")


class ServeSettings(Settings):
    """Serving settings on top of the machine settings (same MEDTUNE_ prefix and .env file)."""

    engine: str = "transformers"
    max_batch_size: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    request_timeout: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    grace_period: float = Field(30.0, ge=0)
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    prefix_caching: bool = True
    overlap_prefill: bool = True
    enforce_eager: bool = False
    jump_forward: bool = True
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = None


def resolve_model(path: str) -> Path:
    """A model folder as given, or a run folder's newest merged stage (dpo, then sft, then pt)."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file() or folder.suffix == ".gguf":
        return folder
    if not folder.exists():
        raise ModelError(
            f"--model: {folder} does not exist (train a model first: medtune run recipes/aria.yaml)"
        )
    for stage in STAGES_NEWEST_FIRST:
        for candidate in (folder / stage, folder / stage / "merged"):
            if (candidate / "config.json").is_file():
                return candidate
    if (folder / "adapter_config.json").is_file():
        raise ModelError(
            f"--model: {folder} is a LoRA adapter, not a model: serve its base with --model and add "
            f"--adapter NAME={folder}"
        )
    raise ModelError(
        f"--model: {folder} holds no model (no config.json) and no merged stage ({', '.join(STAGES_NEWEST_FIRST)})"
    )


def parse_adapters(values: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {value!r}: expected NAME=PATH, e.g. derm=adapters/derm")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


# Recipe `serve:` keys that are also serve options (the recipe describes the run, .env the machine).
RECIPE_KEYS = ("engine", "max_batch_size", "max_queue", "request_timeout", "tensor_parallel_size",
               "quantization", "dtype")  # fmt: skip


def recipe_defaults(
    path: str | None, overrides: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Options and adapters from a recipe's `serve:` section; its model is the run folder."""
    if not path:
        return {}, {}
    from medtune.config import load_recipe

    recipe = load_recipe(path, overrides or [])
    values = {key: getattr(recipe.serve, key) for key in RECIPE_KEYS}
    values["model"] = str(recipe.run_dir)
    return values, dict(recipe.serve.adapters)


def _pick(args: argparse.Namespace, settings: ServeSettings, recipe: dict[str, Any], name: str) -> Any:
    """Command line, then the environment / .env, then the recipe, then the default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    if name in settings.model_fields_set or name not in recipe:
        return getattr(settings, name)
    return recipe[name]


def choose_engine(args: argparse.Namespace, settings: ServeSettings, recipe: dict[str, Any]) -> str:
    """The engine asked for; a .gguf model without an explicit --engine means llama.cpp (the transformers
    engine cannot read one)."""
    name = _pick(args, settings, recipe, "engine")
    model = _pick(args, settings, recipe, "model")
    if args.engine is None and model and Path(str(model)).suffix == ".gguf" and name == "transformers":
        log.info("--model is a GGUF file: serving it with the llamacpp engine")
        return "llamacpp"
    return name


def serve(args: argparse.Namespace) -> int:
    settings = ServeSettings()
    recipe, recipe_adapters = recipe_defaults(args.recipe)
    opt = lambda name: _pick(args, settings, recipe, name)  # noqa: E731
    adapters = {**recipe_adapters, **parse_adapters(args.adapter or [])}
    engine_name = choose_engine(args, settings, recipe)
    if engine_name == "vllm":
        from medtune.serve.engines.vllm import VllmOptions, check_vllm, exec_vllm

        check_vllm()  # say "no vLLM / no GPU" before anything else
        raw = opt("model")  # a local folder, or a hub id vLLM downloads itself
        exec_vllm(VllmOptions(
            model=str(resolve_model(raw)) if Path(raw).expanduser().exists() else raw,
            served_name=opt("served_name"), host=opt("host"), port=opt("port"), api_key=opt("api_key"),
            max_model_len=opt("max_model_len"), gpu_memory_utilization=opt("gpu_memory_utilization"),
            adapters=adapters, tensor_parallel_size=opt("tensor_parallel_size"), dtype=opt("dtype"),
            quantization=opt("quantization"), max_num_seqs=opt("max_batch_size"),
            prefix_caching=opt("prefix_caching"), enforce_eager=opt("enforce_eager"),
        ))  # fmt: skip
        return 0

    import uvicorn

    from medtune.serve.app import ServerConfig, create_app
    from medtune.serve.engines import EngineOptions, create_engine

    model = str(resolve_model(opt("model")))
    log_prompts = bool(args.log_prompts or settings.log_prompts)
    options = EngineOptions(
        max_model_len=opt("max_model_len"), max_batch_size=opt("max_batch_size"), max_queue=opt("max_queue"),
        dtype=opt("dtype"), device=opt("device"), threads=opt("threads"), log_prompts=log_prompts,
        prefix_caching=opt("prefix_caching"), overlap_prefill=opt("overlap_prefill"),
        enforce_eager=opt("enforce_eager"), jump_forward=opt("jump_forward"),
    )  # fmt: skip
    engine = create_engine(engine_name, model, adapters=adapters, options=options)
    engine.start()
    config = ServerConfig(
        served_name=opt("served_name"), api_key=opt("api_key"), max_body_bytes=opt("max_body_bytes"),
        request_timeout=opt("request_timeout"), model_path=model,
    )  # fmt: skip
    app = create_app(engine, config)
    uv_config = uvicorn.Config(
        app, host=opt("host"), port=opt("port"), log_level="warning", access_log=False,
        timeout_graceful_shutdown=round(opt("grace_period")), lifespan="on",
    )  # fmt: skip

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: answer new requests 503 at once; uvicorn lets in-flight ones finish."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

    key = "on" if config.api_key else "OFF (anyone can call it)"
    print(f"medtune: serving {model} as {config.served_name!r} ({engine_name} engine"
          f"{', adapters: ' + ', '.join(adapters) if adapters else ''}) on http://{opt('host')}:{opt('port')}"
          f" - API key {key}", flush=True)  # fmt: skip
    DrainingServer(uv_config).run()
    return 0


def health(args: argparse.Namespace) -> int:
    import httpx

    settings = Settings()
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        response = httpx.get(f"{url}/health", timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"medtune: {url} is not answering: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {
            "status": "ok" if response.status_code == 200 else "error",
            "http_status": response.status_code,
        }
    print(json.dumps(body, ensure_ascii=False, indent=2))
    # vLLM's /health answers 200 with an empty body; medtune's says {"loaded": true, ...}.
    return 0 if response.status_code == 200 and body.get("loaded", True) is not False else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="model folder or run folder (env MEDTUNE_MODEL; default runs/aria/dpo)")
    p.add_argument(
        "--recipe", help="take the run folder, engine, adapters and limits from a recipe's serve section"
    )
    p.add_argument(
        "--adapter", action="append", metavar="NAME=PATH", help="LoRA adapter to load (repeatable)"
    )
    p.add_argument("--engine", choices=["transformers", "llamacpp", "vllm"], help="default: transformers")
    p.add_argument("--served-name", dest="served_name", help="model name clients send (default aria-ft)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="default 8001")
    p.add_argument(
        "--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' (env MEDTUNE_API_KEY)"
    )
    p.add_argument("--max-model-len", dest="max_model_len", type=int, help="context length (default 4096)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, help="requests decoded together (16)")
    p.add_argument("--max-queue", dest="max_queue", type=int, help="waiting requests before 429 (64)")
    p.add_argument("--request-timeout", dest="request_timeout", type=float, help="seconds per request (60)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, help="larger bodies get 413 (1 MiB)")
    p.add_argument("--grace-period", dest="grace_period", type=float, help="SIGTERM drain seconds (30)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", help="auto | cpu | cuda (transformers engine)")
    p.add_argument("--threads", type=int, help="CPU threads for the model")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="prefill every prompt in full (default: reuse the start shared with the last one)")  # fmt: skip
    p.add_argument("--no-overlap-prefill", dest="overlap_prefill", action="store_false", default=None,
                   help="prefill new requests between decoding steps on the decoding thread (default on CPU, "
                        "when the cores allow two model threads: on a second thread, while the batch decodes)")  # fmt: skip
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                   help="run the model's forward passes eagerly (default: as TorchScript graphs that run "
                        "without the GIL, when the model traces faithfully and no adapter is loaded; with vLLM: no CUDA graphs)")  # fmt: skip
    p.add_argument("--no-jump-forward", dest="jump_forward", action="store_false", default=None,
                   help="decode every token of a constrained answer (default: the tokens the grammar forces, "
                        "such as a JSON schema's keys, are fed to the model without decoding them one by one)")  # fmt: skip
    p.add_argument("--log-prompts", dest="log_prompts", action="store_true", default=None,
                   help="log prompts and completions (medical data: off by default)")  # fmt: skip
    g = p.add_argument_group("vLLM engine (GPU)")
    g.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float, help="default 0.90")
    g.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int, help="GPUs per model (1)")
    g.add_argument("--quantization", help="e.g. awq, gptq, fp8")
    p.set_defaults(func=serve)

    h = sub.add_parser("health", help="check that a medtune (or vLLM) server is up and its model loaded")
    h.add_argument("--url", help="server base URL (default http://MEDTUNE_HOST:MEDTUNE_PORT)")
    h.add_argument("--timeout", type=float, default=5.0)
    h.set_defaults(func=health)
