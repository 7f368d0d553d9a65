"""argparse pieces shared by `logstream` and `logstream-train` (light: imports nothing of logstream).

`OneLineErrorParser` turns a usage error into one line and exit 2; `DefaultsHelpFormatter` adds a
flag's default to its help; `unreadable_file` says why an input file cannot be read.
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
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS) and default != []
                and "default" not in text and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


def unreadable_file(path: Path) -> str | None:
    """Why `path` cannot be read as an input file ("no such file", "is a directory", "not readable"), or None.

    Checked when a command runs, not while parsing: a command line is also parsed for another
    machine (a container's command, checked by the deploy tests), where its files live.
    """
    if path.is_dir():
        return f"{path}: is a directory"
    if not path.is_file():
        return f"{path}: no such file"
    if not os.access(path, os.R_OK):
        return f"{path}: not readable"
    return None
