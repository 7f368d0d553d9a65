"""Inputs rebuilt from real-world fault reports (issue 17), shared by unit and integration tests."""

from __future__ import annotations

# Seven HDFS lines written within six seconds; the fourth comes from a node whose clock is two days
# ahead (081111 instead of 081109).
CLOCK_AHEAD_HDFS = [
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660 "
    "terminating",
    "081109 203616 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: /mnt/hadoop/part-0. "
    "blk_-6952295868487656571",
    "081109 203617 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-6952295868487656571 src: "
    "/10.250.10.6:40524 dest: /10.250.10.6:50010",
    "081111 203617 145 INFO dfs.DataNode$DataXceiver: Receiving block blk_7128370237687728475 src: "
    "/10.251.91.84:53203 dest: /10.251.91.84:50010",
    "081109 203618 148 INFO dfs.DataNode$PacketResponder: Received block blk_38865049064139660 of size 67108864 "
    "from /10.251.39.179",
    "081109 203619 145 INFO dfs.DataNode$DataXceiver: Receiving block blk_7128370237687728475 src: "
    "/10.251.91.84:53203 dest: /10.251.91.84:50010",
    "081109 203621 143 INFO dfs.DataNode$PacketResponder: Received block blk_-6952295868487656571 of size "
    "67108864 from /10.250.10.6",
]
CLOCK_AHEAD_INDEX = 3
