"""The `logstream-train` command: subcommand name -> the module that defines it.

Each module exposes `add_parser(subparsers)` (registering its flags and `func`), so commands live
beside the code they run and tests call the same functions. The modules import torch (seconds), so
each is imported inside the function that registers it, and only for the command that runs:
`logstream-train --help` lists the commands from the summaries below without importing any of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

Subparsers = Any  # argparse's subparsers action (a private class)


def _add_evaluate(sub: Subparsers) -> None:
    from trainer.evaluate import add_parser

    add_parser(sub)


def _add_fit(sub: Subparsers) -> None:
    from trainer.fit_logllm import add_parser

    add_parser(sub)


def _add_fit_logllama(sub: Subparsers) -> None:
    from trainer.fit_logllama import add_parser

    add_parser(sub)


COMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "evaluate": _add_evaluate,
    "fit": _add_fit,
    "fit-logllama": _add_fit_logllama,
}
# What `logstream-train --help` says of each command without importing it (`COMMAND --help` says more).
SUMMARIES: dict[str, str] = {
    "evaluate": "score a dump's test windows with a trained model and the baselines; write a report",
    "fit": "three-stage LogLLM fine-tuning on a log dump; writes the artifact `logstream run` serves",
    "fit-logllama": "train the unsupervised LogLLaMA detector (next-key model + top-K reinforcement)",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command's flags (`only=None`), or only those of command `only`.

    The other commands are listed by name and summary, without importing their modules; with
    `only=""` none is imported (`logstream-train --help`).
    """
    from logstream import __version__
    from logstream.argparsing import OneLineErrorParser

    parser = OneLineErrorParser(prog="logstream-train", description="Train and evaluate logstream detectors on "
                                "historical log dumps.")
    parser.add_argument("--version", action="version", version=f"logstream-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_parser in COMMANDS.items():
        if only is None or only == name:
            add_parser(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name], add_help=False)
    return parser


def requested_command(argv: Sequence[str]) -> str:
    """The command named on the command line (its first word that is one), or "" when none is."""
    return next((word for word in argv if word in COMMANDS), "")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(requested_command(words)).parse_args(words)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
