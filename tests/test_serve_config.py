"""`softprompt serve`'s options and `ServeConfig` come from the same settings groups: every
field is an option (bar the vLLM object), a command line gives the config its fields say,
and a bad value is refused where the config is built, naming the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from softprompt.cli import build_parser
from softprompt.cli.options import options_of
from softprompt.serve.server import ServeConfig
from softprompt.serve.vllm_engine import VllmSettings
from softprompt.serve.vllm_process import VllmLaunch
from softprompt.settings import BaseModelConfig, ModelConfig, ServedAdapters


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_serve_config_field_is_an_option_and_the_defaults_agree(monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    parsed = options_of(_serve_args(), ServeConfig)
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    assert fields - set(parsed) - {"adapters", "adapters_dirs", "adapter_roots"} == {"vllm"}
    assert ServeConfig(**parsed) == ServeConfig()  # no option given: the dataclass's defaults


def test_a_serve_command_line_gives_the_fields_it_names(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    args = _serve_args(
        "--model", "m", "--served-model-name", "base", "--device", "CPU", "--dtype", "float32",
        "--adapter", "a=x/one", "--adapter", str(tmp_path / "run" / "best"), "--adapters", "dir1",
        "--adapters", "dir2", "--adapter-root", "r", "--allow-adapter-updates", "--max-batch-size", "8",
        "--max-queue", "9", "--prompt-cache-mb", "1.5", "--padded-batches", "--prefill-tokens", "7",
        "--max-body-mb", "2", "--drain-seconds", "3", "--host", "0.0.0.0", "--port", "9",
    )  # fmt: skip
    config = ServeConfig(**options_of(args, ServeConfig))
    assert config == ServeConfig(
        model="m",
        base_id="base",
        device="cpu",  # normalised as for train
        dtype="float32",
        adapters={"a": "x/one", "run_best": str(tmp_path / "run" / "best")},
        adapters_dirs=["dir1", "dir2"],
        adapter_roots=["r"],
        allow_adapter_updates=True,
        max_batch_size=8,
        max_queue=9,
        prompt_cache_mb=1.5,
        packed=False,
        prefill_tokens=7,
        api_key="from-env",  # --api-key not given: the environment's
        max_body_bytes=2 * 2**20,
        drain_seconds=3.0,
    )
    assert (args.host, args.port) == ("0.0.0.0", 9)
    assert options_of(_serve_args("--api-key", "k"), ServeConfig)["api_key"] == "k"


def test_the_vllm_options_fill_vllm_settings_and_the_launch(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "vk")
    args = _serve_args(
        "--engine", "vllm", "--vllm-url", "http://h:1/v1/", "--vllm-model", "mm", "--vllm-timeout", "5",
        "--vllm-args", "--max-model-len 64",
    )  # fmt: skip
    settings = VllmSettings(**options_of(args, VllmSettings, prefix="vllm_"))
    assert settings == VllmSettings(url="http://h:1/v1", model="mm", timeout_s=5.0, api_key="vk")
    assert VllmLaunch(**options_of(args, VllmLaunch, prefix="vllm_")) == VllmLaunch(args="--max-model-len 64")
    assert options_of(args, ServeConfig)["engine"] == "vllm"


def test_serve_and_train_share_the_model_fields():
    shared = {f.name: f for f in dataclasses.fields(BaseModelConfig)}
    for cls in (ServeConfig, ModelConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, field in shared.items():
            assert fields[name].metadata["help"] == field.metadata["help"], (cls, name)
            assert fields[name].default == field.default
    assert set(dataclasses.fields(ServedAdapters)) <= set(dataclasses.fields(ServeConfig))


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"prefill_tokens": 0}, "prefill_tokens must be at least 1; got 0"),
        ({"max_batch_size": 0}, "max_batch_size must be at least 1; got 0"),
        ({"dtype": "float8"}, "dtype must be auto, float32, bfloat16 or float16; got 'float8'"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
        ({"engine": "trt"}, "engine must be builtin or vllm; got 'trt'"),
        ({"engine": "vllm"}, "engine='vllm' needs vllm=VllmSettings"),
    ],
)
def test_a_bad_serve_config_names_the_value(kw, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("[", r"\[")):
        ServeConfig(**kw)


def test_the_command_line_refuses_a_bad_value_before_loading_anything(tmp_path, capsys):
    from softprompt.cli import main

    assert main(["serve", "--prefill-tokens", "0", "--adapters", str(tmp_path)]) == 2
    assert "prefill_tokens must be at least 1; got 0." in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["serve", "--adapters", str(missing)]) == 2
    assert f"--adapters {str(missing)!r} is not a folder." in capsys.readouterr().err
    assert not Path(missing).exists()
