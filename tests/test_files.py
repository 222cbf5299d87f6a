"""Crash-safe files (`ctnet_rec.files`)."""

from __future__ import annotations

import os

import pytest

from ctnet_rec.files import append_line, read_jsonl, write_atomic


def test_a_failed_replace_leaves_the_old_contents(tmp_path, monkeypatch):
    path = tmp_path / "usage.json"
    write_atomic(path, "old\n")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["usage.json"]

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "newer\n")
    assert path.read_text() == "new\n"


def test_a_torn_last_line_is_dropped_a_damaged_one_refused(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    append_line(path, '{"period": 0}')
    append_line(path, '{"period": 1}')
    path.write_text(path.read_text() + '{"peri')
    assert read_jsonl(path) == [{"period": 0}, {"period": 1}]
    assert "last line is torn" in caplog.text
    path.write_text('{"period": 0}\n{"per\n{"period": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2 is not JSON"):
        read_jsonl(path)
