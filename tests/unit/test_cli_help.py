"""What an operator sees first: --help with defaults and LOGSTREAM_* names, --version, light --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from logstream import __version__
from logstream.cli import build_parser
from logstream.cliargs import env_name
from logstream.settings import Settings
from trainer.cli import build_parser as build_trainer_parser


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def help_text(*argv: str) -> str:
    done = run("-m", "logstream.cli", *argv, "--help")
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # argparse wraps lines; compare on single spaces


def test_run_help_names_every_flag_its_default_and_its_environment_variable() -> None:
    text = help_text("run")
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert env_name(name) in text, name
        default = field.get_default(call_default_factory=True)
        if default not in (None, [], {}) and not isinstance(default, bool):
            assert f"default: {default}" in text, name
    assert "default: 100; env LOGSTREAM_WINDOW_SIZE" in text
    assert "never alerts" in text  # what `--detector null` means, said where the choice is made


def test_every_flag_of_every_command_has_help() -> None:
    def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found.extend(parsers(sub))
        return found

    missing = [f"{parser.prog} {'/'.join(action.option_strings)}"
               for root in (build_parser(), build_trainer_parser())
               for parser in parsers(root) for action in parser._actions
               if action.option_strings and not action.help]
    assert missing == []


def test_version() -> None:
    done = run("-m", "logstream.cli", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"logstream {__version__}"
    trainer = run("-m", "trainer.cli", "--version")
    assert trainer.returncode == 0 and trainer.stdout.strip() == f"logstream-train {__version__}"


def test_usage_errors_are_one_line() -> None:
    done = run("-m", "logstream.cli", "run", "--window", "hourly")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "invalid choice: 'hourly'" in done.stderr
    trainer = run("-m", "trainer.cli", "evaluate", "--dataset", "nope")
    assert trainer.returncode == 2
    assert trainer.stderr.strip().count("\n") == 0 and "invalid choice: 'nope'" in trainer.stderr


def test_trainer_help_imports_no_heavy_library() -> None:
    """`logstream-train --help` lists the commands without importing torch, transformers or peft."""
    probe = ("import sys\nfrom trainer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
             "print('HEAVY', heavy)")
    done = run("-c", probe)
    assert done.returncode == 0, done.stderr
    assert "fit-logllama" in done.stdout and "HEAVY []" in done.stdout


def test_trainer_command_help_still_shows_its_flags() -> None:
    done = run("-m", "trainer.cli", "evaluate", "--help")
    assert done.returncode == 0 and "--assume-normal" in done.stdout and "--report" in done.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA machines keep bitsandbytes (QLoRA)")
def test_no_bitsandbytes_on_cpu() -> None:
    """peft imports bitsandbytes when installed, which warns about CPU kernels on every start; not on CPU."""
    probe = ("import sys\nimport logstream.detectors.logllm, logstream.model\n"
             "print('BNB', sys.modules.get('bitsandbytes', 'absent'))")
    done = run("-c", probe)
    assert done.returncode == 0, done.stderr
    assert "BNB None" in done.stdout
    assert "gemm_4bit" not in done.stderr and "bitsandbytes" not in done.stderr
