"""The `logstream-train` command: subcommand name -> module that defines it.

Each module exposes `add_parser(subparsers)` (registering its flags and `func`), so commands live
beside the code they run and tests call the same functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "evaluate": "trainer.evaluate",
    "fit-logllama": "trainer.fit_logllama",
}


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
