"""Serving engines behind one interface (`medtune.serve.engines.base.Engine`).

    engine = create_engine("transformers", "runs/aria/dpo", adapters={}, options=EngineOptions())

`vllm` is not listed: it runs as its own server process (`medtune.serve.engines.vllm`).
"""

from __future__ import annotations

import difflib
import importlib

from medtune.errors import ConfigError
from medtune.serve.engines.base import Engine, EngineOptions

# name -> "module:Class"; an engine is one module and one line here.
ENGINES = {
    "transformers": "medtune.serve.engines.transformers:TransformersEngine",
    "llamacpp": "medtune.serve.engines.llamacpp:LlamaCppEngine",
}


def create_engine(
    name: str, model: str, adapters: dict[str, str] | None = None, options: EngineOptions | None = None
) -> Engine:
    """Build (not start) the engine called `name`."""
    if name not in ENGINES:
        close = difflib.get_close_matches(name, ENGINES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--engine: unknown engine {name!r} (known: {', '.join(ENGINES)}, vllm){hint}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(model, adapters=adapters, options=options)


__all__ = ["ENGINES", "Engine", "EngineOptions", "create_engine"]
