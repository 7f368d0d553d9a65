"""Settings <-> command-line flags, shared by both entry points (`logstream`, `logstream-train`).

Every Settings field can be a flag (`--field-name`) whose help gives its default and its
`LOGSTREAM_*` variable; unset flags fall back to the environment and the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from logstream.logs import configure_logging, get_logger
from logstream.settings import Settings, unknown_environment

_log = get_logger("logstream.settings")


def env_name(field_name: str) -> str:
    """The environment variable of a Settings field: LOGSTREAM_<NAME>."""
    return f"LOGSTREAM_{field_name.upper()}"


def _settings_help(name: str, field: FieldInfo) -> str:
    """The field's description, its default (unless the description explains it) and its variable."""
    default = field.get_default(call_default_factory=True)
    text = (field.description or "").replace("%", "%%")
    if default in (None, [], {}):
        shown = None if "default" in text else "unset"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = str(default).replace("%", "%%")
    parts = ([f"default: {shown}"] if shown is not None else []) + [f"env {env_name(name)}"]
    return f"{text} [{'; '.join(parts)}]"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_settings_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per Settings field (or per field in `only`); unset flags fall back to env and defaults."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        annotation = field.annotation
        args = typing.get_args(annotation)
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            annotation = next(a for a in args if a is not type(None))
            args, origin = typing.get_args(annotation), typing.get_origin(annotation)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _settings_help(name, field), "dest": name}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(action="append", metavar=name.upper().rstrip("S"))
        elif origin is dict:
            kwargs.update(action="append", type=_key_value, metavar="KEY=VALUE")
        elif origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        parser.add_argument(_flag(name), **kwargs)


def settings_from(namespace: argparse.Namespace) -> Settings:
    given = {name: value for name, value in vars(namespace).items() if name in Settings.model_fields}
    if isinstance(given.get("kafka_option"), list):
        given["kafka_option"] = dict(given["kafka_option"])
    return Settings(**given)


def command_settings(args: argparse.Namespace, flags: Sequence[str], command: str) -> Settings | None:
    """The Settings a `logstream-train` command exposes as flags; None (after saying why on stderr) when
    they are invalid."""
    try:
        return Settings(**{name: value for name, value in vars(args).items() if name in flags})
    except (ValidationError, SettingsError) as exc:
        print(f"logstream-train {command}: invalid settings: {settings_problem(exc)}", file=sys.stderr)
        return None


def settings_problem(exc: ValidationError | SettingsError) -> str:
    """What is wrong with the settings, on one line: each invalid field by its name, flag and variable.

    A `SettingsError` is pydantic-settings failing to decode a variable before validation (it names
    the field and the source); every LOGSTREAM_* value that is not plain text is decoded by a
    validator instead, so that is a fallback.
    """
    if isinstance(exc, SettingsError):
        return str(exc).replace("\n", " ")
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else ""
        known = field in Settings.model_fields
        parts.append(f"{field} ({_flag(field)}, {env_name(field)}): {message}" if known else message)
    return "; ".join(parts)


def start_logging(level: str) -> None:
    """Every command's first log set-up (`logstream`, `logstream-train`, the demo): JSON logs at `level`,
    then a warning per unknown LOGSTREAM_* variable (`warn_unknown_environment`)."""
    configure_logging(level)
    warn_unknown_environment()


def warn_unknown_environment(environ: Mapping[str, str] | None = None) -> None:
    """Log a warning for each LOGSTREAM_* variable that is no setting (ignored, so a typo changes nothing),
    naming the closest setting. Call it once logging is configured (`logs.configure_logging`)."""
    for name, near in unknown_environment(os.environ if environ is None else environ):
        _log.warning("unknown_environment_variable", variable=name, did_you_mean=near,
                     effect="ignored: not a logstream setting")
