"""A group that comes back to a commit it must not trust as it is, against the real broker.

Changed window settings (the commit's fence and snapshot belong to the old ones) and an input topic
deleted and created again (the committed offset names records of the old log): in both, every line
must still be judged, none suppressed as "already published" (`logstream.resume`, `ingest` offset_reset).
"""

from __future__ import annotations

from collections import Counter

import pytest
from structlog.testing import capture_logs

from logstream.pipeline import Pipeline
from logstream.repartition import Repartitioner
from tests.kafkatools import (
    SAMPLES,
    BackgroundPipeline,
    committed_metadata,
    create_topic,
    make_settings,
    produce_lines,
    read_alerts,
    read_topic,
    recreate_topic,
    run_once,
    unique,
    wait_for,
)

BGL = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()


def spans(alerts: list[dict]) -> list[tuple[int, int]]:
    return sorted((a["source"]["first_offset"], a["source"]["last_offset"]) for a in alerts)


def covered(alerts: list[dict]) -> set[int]:
    return {offset for first, last in spans(alerts) for offset in range(first, last + 1)}


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_restart_with_a_smaller_window_size_judges_every_line_from_the_commit(bootstrap: str,
                                                                                guarantee: str) -> None:
    """Size 100 commits offset 1700 with fence 1799 (the window 1700.. open, holding labelled alerts at 1718,
    1739, 1747-1749); restarted with size 50, the window 1700-1749 closes below the old fence: it must be
    published, not suppressed as a replay."""
    topic = unique("resize")
    create_topic(bootstrap, topic)
    lines = BGL[:1799]
    produce_lines(bootstrap, topic, lines)
    first = make_settings(bootstrap, topic, format="bgl", window="count", window_size=100, window_idle_s=0,
                          guarantee=guarantee, group_instance_id=f"{topic}-member")
    running = BackgroundPipeline(first).start()
    assert wait_for(lambda: committed_metadata(bootstrap, first.group_id, topic)[0] == 1700, 30)
    assert running.stop() == 0
    offset, metadata = committed_metadata(bootstrap, first.group_id, topic)
    assert metadata is not None and (offset, metadata["fence"]) == (1700, 1799)
    assert metadata["settings"] == "format=bgl max_line_bytes=1048576 window=count size=100 stride=100"
    assert max(last for _, last in spans(read_alerts(bootstrap, first.alerts_topic))) == 1699

    second = first.model_copy(update={"window_size": 50})
    with capture_logs() as logs:
        assert run_once(second) == 0
    changed = [entry for entry in logs if entry["event"] == "window_settings_changed"]
    assert len(changed) == 1 and changed[0]["old"] == metadata["settings"] and "size=50" in changed[0]["new"]
    assert not [entry for entry in logs if entry["event"] == "replayed_window_suppressed"]

    alerts = read_alerts(bootstrap, first.alerts_topic)
    assert covered(alerts) == set(range(len(lines))), "every line is in some published window"
    assert [span for span in spans(alerts) if span[0] >= 1700] == [(1700, 1749), (1750, 1798)]
    anomalous = {offset for offset, line in enumerate(lines) if not line.startswith(b"- ")}
    assert {1718, 1739, 1747, 1748, 1749} <= anomalous & covered(alerts)
    offset, metadata = committed_metadata(bootstrap, first.group_id, topic)
    assert metadata is not None and (offset, metadata["fence"]) == (1799, 1799) and "size=50" in metadata["settings"]


def recreated(bootstrap: str, **options: object) -> tuple[str, object]:
    """A topic read to its end by a group (committed 1950, fence 1950), then deleted and created again
    with 500 other records: the group's committed offset is beyond the new log's end."""
    topic = unique("recreated")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL[:1950])
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=100, window_idle_s=0,
                             **options)
    assert run_once(settings) == 0
    assert committed_metadata(bootstrap, settings.group_id, topic)[0] == 1950
    recreate_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL[1000:1500])
    return topic, settings


def test_a_recreated_topic_with_fewer_records_is_judged_from_its_start_by_once(bootstrap: str) -> None:
    topic, settings = recreated(bootstrap)
    before = spans(read_alerts(bootstrap, settings.alerts_topic))
    assert len(before) == 20
    with capture_logs() as logs:
        assert run_once(settings) == 0
    beyond = [entry for entry in logs if entry["event"] == "committed_offset_beyond_end"]
    assert len(beyond) == 1 and (beyond[0]["committed_offset"], beyond[0]["high"]) == (1950, 500)
    after = spans(read_alerts(bootstrap, settings.alerts_topic))
    # the new log's five windows (with the offsets, and so the ids, of the old log's first five)
    assert Counter(after) - Counter(before) == Counter((k * 100, k * 100 + 99) for k in range(5))
    offset, metadata = committed_metadata(bootstrap, settings.group_id, topic)
    assert metadata is not None and (offset, metadata["fence"]) == (500, 500)


def test_a_streaming_consumer_judges_a_recreated_topic_after_the_clients_offset_reset(
        bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the check at assignment (the end offsets unknown), the client fetches the committed offset
    1950, is told it is out of range and resets to 0 on its own: the records from 0 must be judged as
    new, not suppressed below the old fence 1950, and the next commit must not carry that fence."""
    topic, settings = recreated(bootstrap)
    monkeypatch.setattr(Pipeline, "_watermarks", lambda self, tp: None)
    before = len(read_alerts(bootstrap, settings.alerts_topic))
    with capture_logs() as logs:
        running = BackgroundPipeline(settings).start()
        try:
            assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == before + 5, 30)
            assert wait_for(lambda: committed_metadata(bootstrap, settings.group_id, topic)[0] == 500, 15)
        finally:
            assert running.stop() == 0
    resets = [entry for entry in logs if entry["event"] == "offset_reset"]
    assert len(resets) == 1 and (resets[0]["offset"], resets[0]["position"]) == (0, 1950)
    assert not [entry for entry in logs if entry["event"] == "replayed_window_suppressed"]
    offset, metadata = committed_metadata(bootstrap, settings.group_id, topic)
    assert metadata is not None and (offset, metadata["fence"]) == (500, 500)


def test_repartition_once_forwards_a_recreated_topic_from_its_start(bootstrap: str) -> None:
    raw, target = unique("rp-raw"), unique("rp-target")
    create_topic(bootstrap, raw)
    create_topic(bootstrap, target)
    hdfs = (SAMPLES / "HDFS_2k.log").read_bytes().splitlines()
    produce_lines(bootstrap, raw, hdfs[:300])
    settings = make_settings(bootstrap, raw, repartition_topic=target, group_id=unique("repartition"), once=True)
    assert Repartitioner(settings).run() == 0
    assert committed_metadata(bootstrap, settings.group_id, raw)[0] == 300
    recreate_topic(bootstrap, raw)
    produce_lines(bootstrap, raw, hdfs[1000:1100])
    with capture_logs() as logs:
        assert Repartitioner(settings).run() == 0
    assert [entry["high"] for entry in logs if entry["event"] == "committed_offset_beyond_end"] == [100]
    forwarded = [message.value() for message in read_topic(bootstrap, target)]
    assert forwarded[300:] == hdfs[1000:1100], "every record of the new log, once"
    assert committed_metadata(bootstrap, settings.group_id, raw)[0] == 100
