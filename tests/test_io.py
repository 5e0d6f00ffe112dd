"""Atomic writes (dist_unlearn.io): a result appears whole under its name, or the old one stays."""

from __future__ import annotations

import json

import pytest

from dist_unlearn.io import atomic_path, staging_path, write_json_atomic, write_text_atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "eval.json"
    write_json_atomic(path, {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"step": ')  # half-written, then the writer dies
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_a_directory_is_replaced_whole_and_a_stale_temporary_is_cleared_first(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    stale = staging_path(out)
    stale.mkdir()
    (stale / "leftover").write_text("from a killed run")
    with atomic_path(out) as staging:
        assert not staging.exists()  # the leftover of a killed run is gone before writing starts
        staging.mkdir()
        (staging / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert not stale.exists()


def test_text_round_trips(tmp_path):
    path = write_text_atomic(tmp_path / "report.md", "# ä\n")
    assert path.read_text(encoding="utf-8") == "# ä\n"
