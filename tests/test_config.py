"""Proxy configuration is strict: unknown or ill-typed fields stop the start with the field named."""

from __future__ import annotations

import pytest

from sloproxy.cli import main
from sloproxy.config import ConfigError, load_config, parse_config

MINIMAL = {
    "listen": {"host": "127.0.0.1", "port": 8000},
    "backends": [
        {"name": "v1", "engine": "vllm", "url": "http://127.0.0.1:9001", "models": ["llama-3-8b"]},
        {"name": "t1", "engine": "tgi", "url": "http://127.0.0.1:9002", "models": ["llama-3-8b"]},
        {"name": "s1", "engine": "sglang", "url": "http://127.0.0.1:9003", "models": ["qwen-7b"]},
    ],
    "policy": {"name": "round-robin"},
}


def test_minimal_config_from_the_issue():
    config = parse_config(MINIMAL)
    assert [b.engine for b in config.backends] == ["vllm", "tgi", "sglang"]
    assert config.limits.retries_before_first_byte == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c.update(colour="red"), "colour"),
        (lambda c: c["listen"].update(port="eighty"), "$.listen.port"),
        (lambda c: c["backends"][1].update(engine="triton"), "$.backends[1].engine"),
        (lambda c: c["backends"][0].update(url="ftp://x"), "$.backends[0]`.url"),
        (lambda c: c["backends"][2].update(models=[]), "$.backends[2]`.models"),
        (lambda c: c["backends"][2].update(name="v1"), "used twice"),
        (lambda c: c["backends"][0].update(weight=3), "weight"),
        (lambda c: c.pop("backends"), "backends"),
    ],
)
def test_bad_configs_name_the_field(mutate, field):
    import copy

    config = copy.deepcopy(MINIMAL)
    mutate(config)
    with pytest.raises(ConfigError) as error:
        parse_config(config)
    assert field in str(error.value)


def test_serve_refuses_a_bad_file_with_exit_2(tmp_path, capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text("backends:\n  - {name: a, engine: vllm, url: http://x, models: [m], speed: 3}\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert main(["serve", "--config", str(path)]) == 2
    assert "speed" in capsys.readouterr().err
