"""The GPU production path: `medtune serve --engine vllm` runs vLLM's own OpenAI server.

    cmd = vllm_command(VllmOptions(model="runs/aria/dpo", served_name="aria-ft", api_key="k",
                                   adapters={"derm": "adapters/derm"}))
    exec_vllm(cmd)        # checks that vLLM and a CUDA GPU are there, then replaces this process

medtune does not wrap vLLM's engine: vLLM already serves the same OpenAI API (paged attention,
continuous batching, multi-LoRA, xgrammar structured outputs, tensor parallelism, AWQ), so the
command line carries medtune's settings over to vLLM's flags and hands the process to it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass, field

from medtune.errors import HardwareError

# vLLM 0.10.2 replaced --guided-decoding-backend with --structured-outputs-config.
_STRUCTURED_OUTPUTS_SINCE = (0, 10, 2)


@dataclass
class VllmOptions:
    model: str
    served_name: str = "aria-ft"
    host: str = "127.0.0.1"
    port: int = 8001
    api_key: str | None = None
    max_model_len: int | None = 4096
    gpu_memory_utilization: float = 0.90
    adapters: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int | None = None  # None: vLLM's default (16); set it for r=32 adapters
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    quantization: str | None = None  # awq, gptq, fp8, bitsandbytes, ...
    max_num_seqs: int | None = None
    seed: int | None = None
    prefix_caching: bool = True  # vLLM's default; False adds --no-enable-prefix-caching
    enforce_eager: bool = False  # True adds --enforce-eager (no CUDA graphs)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def vllm_version() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_command(opts: VllmOptions, version: str | None = None) -> list[str]:
    """The `vllm serve` command line equivalent to `opts` (for the installed vLLM `version`)."""
    version = version or vllm_version() or "0.11.0"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", opts.model,
        "--served-model-name", opts.served_name,
        "--host", opts.host,
        "--port", str(opts.port),
        "--gpu-memory-utilization", f"{opts.gpu_memory_utilization:g}",
        "--tensor-parallel-size", str(opts.tensor_parallel_size),
        "--dtype", opts.dtype,
    ]  # fmt: skip
    if opts.max_model_len:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.quantization:
        cmd += ["--quantization", opts.quantization]
    if opts.max_num_seqs:
        cmd += ["--max-num-seqs", str(opts.max_num_seqs)]
    if not opts.prefix_caching:
        cmd += ["--no-enable-prefix-caching"]
    if opts.enforce_eager:
        cmd += ["--enforce-eager"]
    if opts.seed is not None:
        cmd += ["--seed", str(opts.seed)]
    if _version_tuple(version) >= _STRUCTURED_OUTPUTS_SINCE:
        cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar"})]
    else:
        cmd += ["--guided-decoding-backend", "xgrammar"]
    if opts.adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(opts.adapters))]
        if opts.max_lora_rank:
            cmd += ["--max-lora-rank", str(opts.max_lora_rank)]
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in opts.adapters.items())]
    return cmd


def vllm_env(opts: VllmOptions) -> dict[str, str]:
    """Environment additions: the API key goes through VLLM_API_KEY, not argv (argv shows in `ps`)."""
    return {"VLLM_API_KEY": opts.api_key} if opts.api_key else {}


def check_vllm() -> str:
    """Return the installed vLLM version, or raise HardwareError saying what is missing."""
    version = vllm_version()
    if version is None:
        raise HardwareError(
            "--engine vllm: vLLM is not installed. It needs a Linux machine with an NVIDIA GPU "
            "(CUDA): pip install 'medtune[gpu]'. On this machine use --engine transformers "
            "(or --engine llamacpp for a GGUF file)."
        )
    import torch

    if not torch.cuda.is_available():
        raise HardwareError(
            f"--engine vllm: vLLM {version} is installed but no CUDA GPU is visible "
            "(torch.cuda.is_available() is False). Use --engine transformers on CPU."
        )
    return version


def exec_vllm(opts: VllmOptions) -> None:
    """Check the machine, then replace this process with vLLM's server (never returns)."""
    version = check_vllm()
    cmd = vllm_command(opts, version)
    env = {**os.environ, **vllm_env(opts)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
