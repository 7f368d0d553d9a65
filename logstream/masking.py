"""Variable masking and block ids: the two regular-expression rules every parsed line goes through.

Masking follows the LogLLM recipe (no template parser, regular expressions only): a whitespace-
separated token is replaced by `<*>` when it contains a digit (numbers, ids, IPs with ports, block
ids), contains a `/` (file paths, URLs), or is a long run of hex letters (hex ids without digits).
HDFS block ids are `blk_<digits>` (negative ids have a `-`).
"""

from __future__ import annotations

import re

MASK = "<*>"

_VARIABLE_TOKEN = re.compile(r"(?<!\S)(?:(?=[^\s\d/]*[\d/])\S+|[A-Fa-f]{8,}(?!\S))")
BLOCK_ID = re.compile(r"blk_-?\d+")


def mask(content: str) -> str:
    """Replace variable tokens by `<*>` (see the module docstring for the rule)."""
    return _VARIABLE_TOKEN.sub(MASK, content)


def block_ids(line: str) -> tuple[str, ...]:
    """Every HDFS block id the line names, first occurrence order, without repeats."""
    if "blk_" not in line:  # most lines of most formats: no regex call
        return ()
    found = BLOCK_ID.findall(line)
    if len(found) < 2:
        return tuple(found)
    return tuple(dict.fromkeys(found))
