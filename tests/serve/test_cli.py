"""`medtune serve` options and model resolution, and `medtune health` against live and dead servers."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.errors import ConfigError, ModelError
from medtune.serve.cli import ServeSettings, parse_adapters, resolve_model


def _model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_run_folder_means_its_newest_merged_stage(tmp_path):
    run = tmp_path / "runs" / "aria"
    _model(run / "sft")
    assert resolve_model(str(run)) == run / "sft"
    _model(run / "dpo")
    assert resolve_model(str(run)) == run / "dpo"
    assert resolve_model(str(run / "sft")) == run / "sft"


def test_model_paths_that_hold_no_model_say_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="--adapter NAME="):
        resolve_model(str(adapter))
    with pytest.raises(ModelError, match="no merged stage"):
        resolve_model(str(tmp_path))


def test_adapter_options_are_name_equals_path():
    assert parse_adapters(["derm=a/derm", "radio=/b"]) == {"derm": "a/derm", "radio": "/b"}
    for bad in (["derm"], ["=a"], ["derm=a", "derm=b"]):
        with pytest.raises(ConfigError):
            parse_adapters(bad)


def test_every_option_also_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDTUNE_MAX_QUEUE", "3")
    monkeypatch.setenv("MEDTUNE_API_KEY", "from-env")
    monkeypatch.setenv("MEDTUNE_PORT", "9000")
    monkeypatch.setenv("MEDTUNE_ENFORCE_EAGER", "true")
    monkeypatch.setenv("MEDTUNE_JUMP_FORWARD", "false")
    settings = ServeSettings()
    assert (settings.max_queue, settings.api_key, settings.port) == (3, "from-env", 9000)
    assert settings.enforce_eager and not settings.jump_forward


def test_serve_refuses_a_missing_model_without_a_traceback(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_health_reports_a_live_server(live_server, capsys):
    assert main(["health", "--url", live_server.base_url]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["loaded"] is True and body["served_name"] == "aria-ft"
    assert body["adapters"] == ["derm", "radio"]


def test_health_fails_on_a_dead_port(capsys):
    from fixtures_server import free_port

    assert main(["health", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "not answering" in capsys.readouterr().err


def test_a_recipe_gives_defaults_that_the_environment_and_options_override(monkeypatch, tmp_path):
    import argparse

    from medtune.serve.cli import _pick, recipe_defaults

    (tmp_path / "derm").mkdir()
    recipe = tmp_path / "derm.yaml"
    recipe.write_text(f"name: derm\ntask: aria\noutput_dir: {tmp_path}/runs\nserve:\n  max_queue: 5\n  adapters:\n"
                      f"    derm: {tmp_path}/derm\n", encoding="utf-8")  # fmt: skip
    values, adapters = recipe_defaults(str(recipe))
    assert adapters == {"derm": f"{tmp_path}/derm"} and values["model"] == f"{tmp_path}/runs/derm"
    args = argparse.Namespace(max_queue=None)
    assert _pick(args, ServeSettings(), values, "max_queue") == 5
    monkeypatch.setenv("MEDTUNE_MAX_QUEUE", "7")
    assert _pick(args, ServeSettings(), values, "max_queue") == 7
    assert _pick(argparse.Namespace(max_queue=9), ServeSettings(), values, "max_queue") == 9
    assert _pick(args, ServeSettings(), values, "port") == 8001  # not in the recipe: the default


def test_a_gguf_model_picks_the_llamacpp_engine_unless_told_otherwise():
    import argparse

    from medtune.serve.cli import choose_engine

    def args(**kw):
        return argparse.Namespace(**{"engine": None, "model": None, **kw})

    assert choose_engine(args(model="runs/aria/export/aria-Q8_0.gguf"), ServeSettings(), {}) == "llamacpp"
    assert choose_engine(args(model="runs/aria/dpo"), ServeSettings(), {}) == "transformers"
    explicit = args(model="m.gguf", engine="transformers")
    assert choose_engine(explicit, ServeSettings(), {}) == "transformers"  # then its own error says why
    assert choose_engine(args(), ServeSettings(), {"model": "x.gguf", "engine": "transformers"}) == "llamacpp"


def test_engine_switches_reach_the_engine(monkeypatch, tiny_model_dir):
    """--no-jump-forward, --no-overlap-prefill, --no-prefix-caching and --enforce-eager end up in the
    options the engine is created with (stopped there: no server is started)."""
    import medtune.serve.engines as engines

    seen = {}

    def create(name, model, adapters=None, options=None):
        seen.update(name=name, options=options)
        raise ModelError("stop before loading")

    monkeypatch.setattr(engines, "create_engine", create)
    assert main(["serve", "--model", str(tiny_model_dir)]) == 2
    on = seen["options"]
    assert (on.jump_forward, on.overlap_prefill, on.prefix_caching, on.enforce_eager) == (
        True,
        True,
        True,
        False,
    )
    flags = ["--no-jump-forward", "--no-overlap-prefill", "--no-prefix-caching", "--enforce-eager"]
    assert main(["serve", "--model", str(tiny_model_dir), *flags]) == 2
    off = seen["options"]
    assert seen["name"] == "transformers"
    assert (off.jump_forward, off.overlap_prefill, off.prefix_caching, off.enforce_eager) == (
        False,
        False,
        False,
        True,
    )
