"""The log formats: the plain-line formatter's direct path writes what logging's generic path writes."""

from __future__ import annotations

import json
import logging
import sys
import time

from velesio.logs import JsonLines, Lines


def _record(msg: str, args: tuple, exc_info=None, **extra) -> logging.LogRecord:
    record = logging.LogRecord("velesio.router", logging.INFO if exc_info is None else logging.ERROR, __file__, 1,
                               msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_plain_line_matches_the_generic_formatter():
    fast = Lines()
    record = _record("job %s %s on %s (attempt %d): %s in %.3fs", ("a1", "completion", "m", 2, "ok", 0.01234))
    generic = logging.Formatter.format(fast, record)  # the base class's path, with the same date
    assert fast.format(record) == generic
    assert generic.endswith(" INFO velesio.router: job a1 completion on m (attempt 2): ok in 0.012s")
    assert record.message == "job a1 completion on m (attempt 2): ok in 0.012s"


def test_plain_line_with_a_traceback_keeps_it():
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        record = _record("failed %s", ("x",), exc_info=sys.exc_info())
    line = Lines().format(record)
    assert " ERROR velesio.router: failed x\nTraceback (most recent call last):" in line
    assert line.rstrip().endswith("ZeroDivisionError: boom")


def test_json_lines_carry_the_job_and_worker():
    record = _record("job %s done", ("j1",), job="j1", worker="w1")
    entry = json.loads(JsonLines().format(record))
    assert entry["msg"] == "job j1 done" and entry["job"] == "j1" and entry["worker"] == "w1"
    assert entry["level"] == "INFO" and entry["ts"].endswith("Z")


def test_plain_line_date_follows_each_record_second():
    fast = Lines()
    for created in (1_700_000_000.25, 1_700_000_001.5, 1_700_000_000.75):  # a second back too
        record = _record("x", ())
        record.created, record.msecs = created, (created % 1) * 1000
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(created)))
        assert fast.format(record).startswith(f"{stamp},{int(record.msecs):03d} INFO ")
