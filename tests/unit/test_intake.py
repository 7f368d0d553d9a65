"""How many records the poll loop asks for: `intake.ConsumeSizer`."""

from __future__ import annotations

import pytest

from logstream.intake import ConsumeSizer


def test_before_any_batch_one_record_per_window_of_room() -> None:
    sizer = ConsumeSizer(2000)
    assert sizer.records(256) == 256
    assert sizer.records(0) == 1 and sizer.records(-40) == 1  # a full queue still polls (one record)


def test_count_windows_learn_their_rate_and_ask_for_up_to_the_most() -> None:
    sizer = ConsumeSizer(2000)
    for _ in range(40):
        records = sizer.records(256)
        sizer.observe(records, records // 100)  # a window every 100 lines
    assert sizer.records(256) == 2000
    assert 450 <= sizer.records(5) <= 520  # five windows of room: about 500 lines


def test_sessions_closing_a_window_every_seven_lines() -> None:
    sizer = ConsumeSizer(2000)
    for _ in range(60):
        records = sizer.records(256)
        sizer.observe(records, records // 7)
    assert 1500 <= sizer.records(256) <= 2000
    assert 50 <= sizer.records(10) <= 90


def test_a_burst_of_windows_shrinks_the_next_calls() -> None:
    sizer = ConsumeSizer(2000)
    sizer.observe(2000, 2000 * 3)  # expiry closed three windows a record
    assert sizer.records(256) < 256


def test_remaining_records_cap_a_once_run() -> None:
    sizer = ConsumeSizer(2000)
    assert sizer.records(256, remaining=10) == 10
    assert sizer.records(256, remaining=0) == 1
    sizer.observe(0, 5)  # an empty batch teaches nothing
    assert sizer.rate == 1.0


def test_most_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConsumeSizer(0)
