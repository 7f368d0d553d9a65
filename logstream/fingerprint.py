"""The window settings a commit was made with: a fingerprint carried in the commit metadata.

A commit's offset C, fence F and windower snapshot (`checkpoint`) mean something only under the
settings that made them: replayed from C with another window size, kind, format or session gap,
the windows that close below F are not the ones that were published, yet the fence suppresses them
as "already published", so their lines are never judged. The pipeline therefore writes a
fingerprint of every setting that decides which windows a sequence of records makes, and a new
owner that finds another one drops the fence and the snapshot (`resume.resume_position`).

What decides the windows (and nothing else, so that changing, say, the detector or the commit
interval does not cost a replay):
  - the parser: `--format` (which records are lines, their event times and block ids) and
    `--max-line-bytes` (a longer record is dead-lettered, not a line);
  - `--window` and, for count windows, `--window-size` and the stride;
  - for session windows, the effective session gap, `--session-grace`, `--session-max-lines`,
    `--session-max-open` and the event-time bound (its seconds; policy and confirm lines when it is on).
Idle cuts (`--window-idle-s`, `--session-idle-s`) are not in it: a cut is recorded in the snapshot by
offset and replayed whatever the idle setting is now.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from logstream.settings import Settings

DIGEST_BYTES = 8  # 16 hex characters: the commit metadata is bounded (Kafka: 4 KB by default)


@dataclass(frozen=True, slots=True)
class WindowFingerprint:
    """`digest`: what commits are compared on; `summary`: the same settings for people (`k=v`, space-separated)."""

    digest: str
    summary: str


def window_fingerprint(settings: Settings) -> WindowFingerprint:
    """The fingerprint of the settings in `settings` that decide windows (see the module docstring).

    Equal settings give equal digests on every host and version that writes this summary; a change of
    any of those settings changes the summary and so the digest. Settings of the other window kind are
    left out (a session gap does not matter to count windows)."""
    fields: list[tuple[str, object]] = [("format", settings.format), ("max_line_bytes", settings.max_line_bytes),
                                        ("window", settings.window)]
    if settings.window == "count":
        fields += [("size", settings.window_size), ("stride", settings.stride)]
    else:
        gap = settings.effective_session_gap
        bound = settings.future_bound(gap)
        fields += [("gap", gap), ("grace", settings.session_grace), ("max_lines", settings.session_max_lines),
                   ("max_open", settings.session_max_open), ("max_future", bound or 0)]
        if bound:
            fields += [("future_policy", settings.future_policy), ("future_confirm", settings.future_confirm_lines)]
    summary = " ".join(f"{name}={_text(value)}" for name, value in fields)
    digest = hashlib.blake2b(summary.encode(), digest_size=DIGEST_BYTES).hexdigest()
    return WindowFingerprint(digest, summary)


def _text(value: object) -> str:
    """A setting as the summary writes it: integral floats without a decimal part, other floats exactly."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)
