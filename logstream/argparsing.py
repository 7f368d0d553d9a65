"""argparse pieces shared by `logstream` and `logstream-train` (light: imports nothing of logstream).

`OneLineErrorParser` turns a usage error into one line and exit 2; `DefaultsHelpFormatter` adds a
flag's default to its help; `readable_file` checks a file argument while parsing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2): the problem and where the help is, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends a flag's default to its help unless the help already says it (or there is none to say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS)
                and "default" not in text and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


def readable_file(text: str) -> Path:
    """argparse type: a path to a file that exists and can be read (else a one-line usage error)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'is a directory' if path.is_dir() else 'no such file'}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return path
