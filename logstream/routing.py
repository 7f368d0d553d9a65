"""Routing a raw line to the partitions of its blocks: one rule for `produce --key block` and `repartition`.

Partition of a block = crc32(block id) mod partitions: stable across restarts, clients and languages.
A line naming blocks that map to different partitions is written once per partition, with the header
`logstream.blocks` listing only the blocks routed there, so each session sees the line exactly once
and no partition opens sessions for blocks it does not own; every copy but the one on the partition
of the line's first block also carries `logstream.copy-of` (that partition), so count windows and
the dead-letter topic take the line once. The consumer honours both headers (`ingest`).
Lines without a block id keep their raw partition (mod the target's partitions).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from logstream.parsing import block_ids

BLOCKS_HEADER = "logstream.blocks"  # the blocks of a multi-block line this record carries
COPY_HEADER = "logstream.copy-of"  # on every copy but the primary: the primary's partition


@dataclass(frozen=True, slots=True)
class Routed:
    """One record carrying a line: where it goes (None: the producer's partitioner), key, headers."""

    partition: int | None
    key: bytes | None
    headers: list[tuple[str, bytes]] | None


def block_partition(block: str, partitions: int) -> int:
    """crc32 of the block id modulo the partitions: the same for every client, restart and language."""
    return zlib.crc32(block.encode()) % partitions


def route(value: bytes | None, partitions: int, unkeyed_partition: int | None = None,
          key: bytes | None = None) -> list[Routed]:
    """The records that carry one line keyed by block id, the primary copy first.

    One record per partition owning some of the line's blocks (`parsing.block_ids`), keyed by the
    first block routed there. A line naming several blocks carries `BLOCKS_HEADER` on each record,
    and `COPY_HEADER` on all but the primary (the partition of its first block). A line without a
    block id keeps `key` and goes to `unkeyed_partition`.
    """
    blocks = block_ids(value.decode("utf-8", "replace")) if value else ()
    if not blocks:
        return [Routed(unkeyed_partition, key, None)]
    targets: dict[int, list[str]] = {}
    for block in blocks:
        targets.setdefault(block_partition(block, partitions), []).append(block)
    primary = block_partition(blocks[0], partitions)
    return [Routed(partition, here[0].encode(), _headers(blocks, here, partition, primary))
            for partition, here in targets.items()]


def _headers(blocks: Sequence[str], here: list[str], partition: int, primary: int) -> list[tuple[str, bytes]] | None:
    if len(blocks) < 2:
        return None
    headers = [(BLOCKS_HEADER, ",".join(here).encode())]
    if partition != primary:
        headers.append((COPY_HEADER, str(primary).encode()))
    return headers
