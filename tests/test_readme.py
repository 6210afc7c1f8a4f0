"""The README's examples must not rot: every `modelgrow ...` command in its bash blocks parses with the real
command-line parsers (subcommand, flags, `--section.key value` overrides checked against the typed config),
and every python block compiles and imports names that exist (`cache` and `recaption` take the typed config too). (Running them for real needs released
checkpoints; the tiny-model tests run the same commands end to end.)"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from modelgrow import cli
from modelgrow.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    return [body for kind, body in BLOCK.findall(re.sub(r"^ +", "", text, flags=re.M)) if kind == lang]


def _commands() -> list[str]:
    """`modelgrow ...` lines of the bash blocks, and inline `modelgrow <command> <arguments>` spans of the text
    (optional parts in [brackets] dropped: they are placeholders)."""
    out = []
    for body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("modelgrow "):
                out.append(line)
    for span in re.findall(r"`(modelgrow [^`]*)`", README.read_text()):
        span = re.sub(r"\s*\[[^\]]*\]", "", span).strip()
        if len(span.split()) > 2 and span not in out:  # a command with arguments, not a mention of one
            out.append(span)
    return out


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, argv: list[str]) -> None:
    """Run the command's own argparse parser on argv (errors -> SystemExit), never the command."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = original(self, args, namespace)
        raise _Parsed((ns, rest))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    with pytest.raises(_Parsed) as parsed:
        cli.main(argv)
    ns, rest = parsed.value.args[0]
    if argv[0] in ("demo", "evaluate"):
        assert not rest, f"unknown arguments {rest}"
        return
    rest += cli.shorthand_overrides(ns)  # grow's --strategy, pipeline's --steps, ... (cache / recaption: none)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", original)
    config = README.parent / str(getattr(ns, "config", None) or "")
    load_config(config if config.is_file() else None, rest)  # the file (when it exists), override keys and values


def test_readme_has_commands():
    cmds = _commands()
    assert len(cmds) >= 7 and {c.split()[1] for c in cmds} >= {"grow", "pipeline", "sample", "recaption", "evaluate",
                                                                "export", "train", "config"}


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command, monkeypatch):
    argv = shlex.split(command)[1:]
    _parse_only(monkeypatch, argv)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_imports_exist(index):
    tree = ast.parse(_blocks("python")[index])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
