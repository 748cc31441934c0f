"""The command line reads well: every flag has help, no docstring markup leaks into ``--help``, and the
README names every subcommand."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from sloproxy.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
MARKUP = re.compile(r"``|:(?:func|class|meth|mod|attr):`")


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("sloproxy",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_flag_and_subcommand_has_help():
    missing = []
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_no_docstring_markup_in_help():
    for path, parser in parsers(build_parser()):
        text = parser.format_help()
        assert not MARKUP.search(text), f"{' '.join(path)} --help shows docstring markup"


def test_the_readme_names_every_subcommand():
    for path, _ in parsers(build_parser()):
        if len(path) == 2:
            assert re.search(rf"sloproxy {path[1]}\b", README), f"README.md never shows `sloproxy {path[1]}`"


def test_check_prints_the_effective_config_and_names_a_bad_field(tmp_path: Path):
    import subprocess
    import sys

    import yaml

    good = tmp_path / "proxy.yaml"
    good.write_text(
        "backends:\n"
        "  - {name: o1, engine: openai, url: 'https://api.example.com', models: [gpt-x], api_key: sk-secret-1,"
        " max_context_tokens: 128000}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "sloproxy.cli", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    effective = yaml.safe_load(run.stdout)
    assert effective["policy"]["name"] == "slo" and effective["context"] == {"clamp_max_tokens": True}
    assert effective["backends"][0]["api_key"] == "***" and "sk-secret-1" not in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - {name: o1, engine: openai, url: 'https://api.example.com', models: [gpt-x]}\n")
    run = subprocess.run(
        [sys.executable, "-m", "sloproxy.cli", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "`$.backends[0]`.max_context_tokens is required" in run.stderr
