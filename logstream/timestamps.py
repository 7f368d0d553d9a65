"""Leading timestamps of the generic format: which common prefixes are recognised, and their time.

A generic line's timestamp is event time and must stay out of the template, or the same event on
another day would be a new template. One anchored pattern finds where a recognised prefix ends
(no date library finds a prefix's extent safely: fuzzy parsers take digits from anywhere in the
line); the standard library's `datetime.fromisoformat` / `datetime.strptime` turn the matched text
into a time. Recognised, at the start of the line:

| style | example | time zone |
|---|---|---|
| ISO-8601 / RFC 3339 | `2024-01-02T03:04:05.5+01:00`, `2024-01-02 03:04:05` | given, else UTC |
| log4j / logback | `2024-01-02 03:04:05,678`, `[2024-01-02 03:04:05,678]` | given, else UTC |
| RFC 5424 syslog | `<34>1 2003-10-11T22:14:15.003Z host app ...` | given |
| BSD syslog (RFC 3164) | `Nov  3 04:12:01 host ...`, `<34>Nov  3 04:12:01 ...` | UTC; year inferred |
| nginx error log | `2024/01/02 03:04:05 [error] ...` | UTC |
| Apache error log | `[Wed Oct 11 14:32:52.123456 2000] [core:error] ...` | UTC |
| Apache/nginx access log | `[10/Oct/2000:13:55:36 -0700]`, first or after `host ident user` | given |
| epoch | `1700000000`, `1700000000.123` (seconds), `1700000000123` (ms) | UTC |

The prefix must be followed by whitespace or end the line. Syslog priorities (`<PRI>`, `<PRI>1`) go
with the stamp. BSD syslog has no year: it is the latest year that puts the stamp no more than
`SYSLOG_FUTURE_SLACK_S` (7 days) after a reference time, the record's Kafka timestamp when it has one
(so a replay gives the same times), else the time the parser was made (files): a `Dec 31` stamp
read on Jan 2 is last year's, a `Jan 1` stamp on Dec 30 (a clock slightly ahead) next year's.
Epoch stamps count only with 10 digits (seconds) or 13 (milliseconds) and a time in 2001-2099
(`EPOCH_RANGE_S`), so a leading count such as `1234 requests` or `4294967295 bytes` stays content.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone

SYSLOG_FUTURE_SLACK_S = 7 * 86_400.0
EPOCH_RANGE_S = (1_000_000_000.0, 4_102_444_800.0)  # 2001-09-09 .. 2100-01-01 UTC

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_ISO = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
_CLF = r"\d{2}/" + _MONTH + r"/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}"
_PREFIX = re.compile(
    r"(?:<\d{1,3}>(?:\d{1,2} )?)?"  # syslog PRI, with the RFC 5424 version
    r"(?:"
    rf"(?P<iso>{_ISO})|\[(?P<iso_bracket>{_ISO})\]"
    rf"|(?P<bsd>{_MONTH} {{1,2}}\d{{1,2}} \d{{2}}:\d{{2}}:\d{{2}}(?:\.\d{{1,9}})?)"
    r"|(?P<slash>\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2})"
    rf"|\[(?P<ctime>(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} {{1,2}}\d{{1,2}} "
    rf"\d{{2}}:\d{{2}}:\d{{2}}(?:\.\d{{1,9}})? \d{{4}})\]"
    rf"|\[(?P<clf>{_CLF})\]"
    r"|(?P<epoch>\d{10}(?:\.\d{1,9})?|\d{13})"
    r")(?:\s+|$)",
    re.ASCII,  # stamps are ASCII: other scripts' digits are content
)
# An access log (Common/Combined Log Format) puts its stamp after `host ident authuser`.
_ACCESS_LOG = re.compile(rf"(\S+ \S+ \S+ )\[({_CLF})\](?:\s+|$)", re.ASCII)


_CLF_FORMAT = "%d/%b/%Y:%H:%M:%S %z"
_BSD_FORMAT = "%Y %b %d %H:%M:%S"


def _utc(parsed: datetime) -> float:
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


@functools.lru_cache(maxsize=8192)
def _strptime_seconds(text: str, fmt: str) -> float | None:
    """`strptime` as epoch seconds (UTC unless the text has an offset); None if it is not a real time.

    Memoised: a busy stream repeats each whole-second stamp on many lines, so the (slow) strptime runs
    about once per distinct second, not once per line.
    """
    try:
        return _utc(datetime.strptime(text, fmt))
    except ValueError:
        return None


def _fraction(digits: str) -> float:
    return int(digits) / 10 ** len(digits) if digits else 0.0


def _bsd_time(stamp: str, reference: float) -> float:
    """A year-less syslog stamp as UTC seconds, in the year chosen against `reference` (see module)."""
    clock, _, fraction = stamp.partition(".")
    month_day_time = " ".join(clock.split())
    base_year = datetime.fromtimestamp(reference, timezone.utc).year if reference > 0 else 1970
    latest = reference + SYSLOG_FUTURE_SLACK_S
    for year in range(base_year + 1, base_year - 9, -1):  # Feb 29 may need a few years back
        seconds = _strptime_seconds(f"{year} {month_day_time}", _BSD_FORMAT)
        if seconds is not None and seconds <= latest:
            return seconds + _fraction(fraction)
    raise ValueError(f"no year fits {stamp!r}")


def _checked(seconds: float | None) -> float:
    if seconds is None:
        raise ValueError("not a real time")
    return seconds


def _time(match: re.Match[str], reference: float) -> float:
    kind = match.lastgroup
    stamp = match.group(kind)  # type: ignore[arg-type]
    if kind in ("iso", "iso_bracket"):
        return _utc(datetime.fromisoformat(stamp.replace(",", ".")))
    if kind == "bsd":
        return _bsd_time(stamp, reference)
    if kind == "slash":
        return _checked(_strptime_seconds(stamp, "%Y/%m/%d %H:%M:%S"))
    if kind == "ctime":
        head, _, year = stamp.rpartition(" ")
        clock, _, fraction = head.partition(".")
        seconds = _checked(_strptime_seconds(f"{year} {' '.join(clock.split())}", "%Y %a %b %d %H:%M:%S"))
        return seconds + _fraction(fraction)
    if kind == "clf":
        return _checked(_strptime_seconds(stamp, _CLF_FORMAT))
    seconds = float(stamp) if len(stamp) != 13 or "." in stamp else int(stamp) / 1000.0  # epoch s or ms
    if not EPOCH_RANGE_S[0] <= seconds < EPOCH_RANGE_S[1]:
        raise ValueError("a number, not a plausible epoch time")
    return seconds


def leading_timestamp(line: str, reference: float) -> tuple[str, float] | None:
    """`(content, event time in epoch seconds)` when the line starts with a recognised stamp, else None.

    `reference` (epoch seconds; <= 0 for none) only dates year-less syslog stamps. A prefix that has
    a recognised shape but is not a real time (month 13, Feb 30) is not a timestamp: None.
    """
    match = _PREFIX.match(line)
    if match is not None:
        try:
            return line[match.end():], _time(match, reference)
        except (ValueError, OverflowError):
            return None
    access = _ACCESS_LOG.match(line)
    if access is not None:
        seconds = _strptime_seconds(access.group(2), _CLF_FORMAT)
        return None if seconds is None else (access.group(1) + line[access.end():], seconds)
    return None
