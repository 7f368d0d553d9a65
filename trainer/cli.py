"""The `logstream-train` command: subcommand name -> module that defines it.

Each module exposes `add_parser(subparsers)` (registering its flags and `func`), so commands live
beside the code they run and tests call the same functions. The modules import torch (seconds), so
`main` imports only the one that runs: `logstream-train --help` lists the commands from the
summaries below without importing any of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from logstream.settings import Settings

COMMANDS: dict[str, str] = {
    "evaluate": "trainer.evaluate",
    "fit": "trainer.fit_logllm",
    "fit-logllama": "trainer.fit_logllama",
}
# What `logstream-train --help` says of each command without importing it (`COMMAND --help` says more).
SUMMARIES: dict[str, str] = {
    "evaluate": "score a dump's test windows with a trained model and the baselines; write a report",
    "fit": "three-stage LogLLM fine-tuning on a log dump; writes the artifact `logstream run` serves",
    "fit-logllama": "train the unsupervised LogLLaMA detector (next-key model + top-K reinforcement)",
}


def command_settings(args: argparse.Namespace, flags: Sequence[str], command: str) -> Settings | None:
    """The Settings a subcommand exposes as flags; None (after saying why on stderr) when they are invalid."""
    from pydantic import ValidationError

    from logstream.settings import Settings

    try:
        return Settings(**{name: value for name, value in vars(args).items() if name in flags})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"logstream-train {command}: invalid settings: {problems}", file=sys.stderr)
        return None


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
    for name, module_name in COMMANDS.items():
        if only is None or only == name:
            importlib.import_module(module_name).add_parser(sub)
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
