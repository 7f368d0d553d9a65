"""The `logstream-train` command: subcommand name -> module that defines it.

Each module exposes `add_parser(subparsers)` (registering its flags and `func`), so commands live
beside the code they run and tests call the same functions.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logstream-train", description="Train and evaluate logstream detectors "
                                     "on historical log dumps.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
