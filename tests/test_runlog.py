"""Run ids, run records and the log file's text, without Ray."""

from __future__ import annotations

import json
import logging

from pipeline.runlog import RunLog, new_run_id, plain_text, write_run_record
from pipeline.store import Store


def test_run_ids_sort_by_start_time_and_differ_within_a_millisecond():
    start = 1_800_000_000.0
    ids = [new_run_id(start + k * 0.0105) for k in range(5)] + [new_run_id(start + 1.9999)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0].startswith("20270115T080000.000Z-") and ids[1].startswith("20270115T080000.010Z-")
    assert ids[-1].startswith("20270115T080001.999Z-")
    assert new_run_id(start) != new_run_id(start)


def test_records_keep_every_run_and_a_legacy_manifest(tmp_path):
    legacy = {"config": {"num_frames": 8}, "finished_at": "2026-11-26T10:00:00Z"}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    path = write_run_record(Store(str(tmp_path)), "20261129T080000.000Z-aaaaaa", {"run_id": "20261129T080000.000Z-aaaaaa"})
    assert path == str(tmp_path / "runs" / "20261129T080000.000Z-aaaaaa.json")
    assert json.loads((tmp_path / "runs" / "20261126T100000.000Z-legacy.json").read_text()) == legacy
    write_run_record(Store(str(tmp_path)), "20261129T090000.000Z-bbbbbb", {"run_id": "20261129T090000.000Z-bbbbbb"})
    assert json.loads((tmp_path / "manifest.json").read_text())["run_id"] == "20261129T090000.000Z-bbbbbb"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "20261126T100000.000Z-legacy.json", "20261129T080000.000Z-aaaaaa.json", "20261129T090000.000Z-bbbbbb.json"]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_an_unreadable_old_manifest_is_kept_byte_for_byte(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"")
    write_run_record(Store(str(tmp_path)), "20261129T080000.000Z-aaaaaa", {"run_id": "20261129T080000.000Z-aaaaaa"})
    (legacy,) = (tmp_path / "runs").glob("*-legacy.json")
    assert legacy.read_bytes() == b""


def test_the_log_file_keeps_plain_text():
    assert plain_text("\x1b[36m(f pid=1)\x1b[0m ok") == "(f pid=1) ok"
    assert plain_text("Loading:   0%|  | 0/7\rLoading: 100%|##| 7/7\r") == "Loading: 100%|##| 7/7"
    assert plain_text("a\nb\rc") == "a\nc"


def test_the_log_file_keeps_info_when_the_console_asks_for_less(tmp_path):
    with RunLog(str(tmp_path), "rid", "ERROR") as run_log:
        logging.getLogger("pipeline.example").info("kept")
        logging.getLogger("pipeline.example").debug("not asked for")
    text = (tmp_path / "logs" / "rid.log").read_text()
    assert run_log.path == str(tmp_path / "logs" / "rid.log")
    assert " INFO pipeline.example: kept" in text and "not asked for" not in text
