"""`medtune serve --engine vllm`: the vLLM command it builds, and clear errors where vLLM cannot run."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.errors import HardwareError
from medtune.serve.engines import vllm
from medtune.serve.engines.vllm import VllmOptions, vllm_command, vllm_env


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_command_carries_every_setting_over_to_vllm():
    opts = VllmOptions(model="runs/aria/dpo", served_name="aria-ft", port=8001, api_key="secret", max_model_len=4096,
                       gpu_memory_utilization=0.85, adapters={"derm": "a/derm", "radio": "a/radio"},
                       max_lora_rank=32, tensor_parallel_size=2, dtype="bfloat16", quantization="awq")  # fmt: skip
    cmd = vllm_command(opts, version="0.11.0")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--model") == "runs/aria/dpo"
    assert _flag(cmd, "--served-model-name") == "aria-ft"
    assert _flag(cmd, "--port") == "8001"
    assert _flag(cmd, "--max-model-len") == "4096"
    assert _flag(cmd, "--gpu-memory-utilization") == "0.85"
    assert _flag(cmd, "--tensor-parallel-size") == "2"
    assert _flag(cmd, "--dtype") == "bfloat16"
    assert _flag(cmd, "--quantization") == "awq"
    assert json.loads(_flag(cmd, "--structured-outputs-config")) == {"backend": "xgrammar"}
    assert "--enable-lora" in cmd and _flag(cmd, "--max-lora-rank") == "32"
    i = cmd.index("--lora-modules")
    assert cmd[i + 1 : i + 3] == ["derm=a/derm", "radio=a/radio"]
    # The key reaches vLLM through its environment, never through argv (visible to `ps`).
    assert "secret" not in " ".join(cmd) and vllm_env(opts) == {"VLLM_API_KEY": "secret"}


def test_older_vllm_gets_its_own_structured_output_flag():
    cmd = vllm_command(VllmOptions(model="m"), version="0.9.2")
    assert _flag(cmd, "--guided-decoding-backend") == "xgrammar"
    assert "--structured-outputs-config" not in cmd and "--enable-lora" not in cmd
    assert "--no-enable-prefix-caching" not in cmd  # vLLM's prefix caching stays on by default


def test_no_prefix_caching_reaches_vllm():
    cmd = vllm_command(VllmOptions(model="m", prefix_caching=False), version="0.11.0")
    assert "--no-enable-prefix-caching" in cmd


def test_enforce_eager_reaches_vllm():
    assert "--enforce-eager" not in vllm_command(VllmOptions(model="m"), version="0.11.0")
    assert "--enforce-eager" in vllm_command(VllmOptions(model="m", enforce_eager=True), version="0.11.0")


def test_missing_vllm_is_a_clear_hardware_error(monkeypatch):
    monkeypatch.setattr(vllm, "vllm_version", lambda: None)
    with pytest.raises(HardwareError, match=r"vLLM is not installed.*--engine transformers"):
        vllm.check_vllm()


def test_vllm_without_a_gpu_is_a_clear_hardware_error(monkeypatch):
    import torch

    monkeypatch.setattr(vllm, "vllm_version", lambda: "0.11.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HardwareError, match="no CUDA GPU"):
        vllm.check_vllm()


def test_the_cli_reports_it_without_a_traceback(capsys, tmp_path):
    if vllm.vllm_version() is not None:
        pytest.skip("vLLM is installed here")
    assert main(["serve", "--engine", "vllm", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "Traceback" not in err
