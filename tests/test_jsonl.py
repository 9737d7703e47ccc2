"""agentopd/jsonl.py: rows written and read back (unicode, gzip), a torn last line dropped only
where asked, a bad line before the last named by file and line, unreadable lines dropped with a
count, and an atomic write that leaves the old file and no temporary one when it fails."""
from __future__ import annotations

import gzip
import os

import pytest

from agentopd import faults, jsonl

ROWS = [{"step": 1, "text": "naïve café ✓ 東京", "x": [1.5, None]}, {"step": 2, "emoji": "🙂"}]


def test_append_then_read_round_trip_with_unicode(tmp_path):
    path = str(tmp_path / "m.jsonl")
    jsonl.append(path, ROWS[:1])
    jsonl.append(path, ROWS[1:])
    assert jsonl.read(path) == ROWS
    assert jsonl.numbered(path) == [(1, ROWS[0]), (2, ROWS[1])]


def test_write_replaces_the_file(tmp_path):
    path = str(tmp_path / "r.jsonl")
    jsonl.write(path, ROWS)
    jsonl.write(path, ROWS[1:])
    assert jsonl.read(path) == ROWS[1:]
    assert os.listdir(tmp_path) == ["r.jsonl"]


def test_blank_lines_are_skipped_and_numbers_are_the_file_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert jsonl.numbered(str(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_a_gz_file_is_read_decompressed(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"id": "é"}\n')
    assert jsonl.read(str(path)) == [{"id": "é"}]


def torn(tmp_path):
    """A file whose last line a crash cut short."""
    path = tmp_path / "torn.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.')
    return str(path)


def test_a_torn_last_line_is_an_error_unless_skipped(tmp_path):
    path = torn(tmp_path)
    with pytest.raises(jsonl.JSONLError, match=r"torn.jsonl:3: not valid JSON"):
        jsonl.read(path)
    with pytest.warns(UserWarning, match="last line is incomplete"):
        assert jsonl.read(path, skip_torn_last=True) == [{"step": 1}, {"step": 2}]


def test_a_torn_last_line_followed_by_blank_lines_is_still_the_last(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"step": 1}\n{"ste\n\n')
    with pytest.warns(UserWarning, match="last line is incomplete"):
        assert jsonl.read(str(path), skip_torn_last=True) == [{"step": 1}]


@pytest.mark.parametrize("line, why", [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")])
def test_a_bad_line_before_the_last_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"a": 1}}\n{line}\n{{"a": 3}}\n')
    for skip in (False, True):
        with pytest.raises(jsonl.JSONLError) as e:
            jsonl.read(str(path), skip_torn_last=skip)
        assert str(e.value).startswith(f"{path}:2: {why}")


def test_skip_unreadable_drops_every_bad_line_and_counts_them(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo{"step": 0}\n"text"\n{"step": 3}\n{"ste')
    with pytest.warns(UserWarning, match=r"3 unreadable line\(s\) dropped \(line 2, 3, 5\)"):
        assert jsonl.read(str(path), skip_unreadable=True) == [{"step": 1}, {"step": 3}]


@pytest.mark.parametrize("what, words", [("missing", "no such file"), ("directory", "is a directory"),
                                         ("latin1", "not UTF-8"), ("bad_gzip", "cannot read it")])
def test_unreadable_files_name_the_file(tmp_path, what, words):
    path = tmp_path / ("x.jsonl.gz" if what == "bad_gzip" else "x.jsonl")
    if what == "directory":
        path.mkdir()
    elif what == "latin1":
        path.write_bytes(b'{"a": "caf\xe9"}\n')
    elif what == "bad_gzip":
        path.write_bytes(b"not gzip at all")
    with pytest.raises(jsonl.JSONLError) as e:
        jsonl.read(str(path))
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value)


class Unwritable:
    """Not JSON: ``json.dumps`` raises TypeError on it."""


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = str(tmp_path / "r.jsonl")
    jsonl.write(path, ROWS)
    with pytest.raises(TypeError):
        jsonl.write(path, [{"step": 9}, {"bad": Unwritable()}])
    assert jsonl.read(path) == ROWS and os.listdir(tmp_path) == ["r.jsonl"]


def test_a_write_that_fails_on_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "r.jsonl")
    jsonl.write(path, ROWS)

    def replace_fails(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(faults.WriteFailed, match=r"cannot write .*r.jsonl: disk full; .* free there"):
        jsonl.write(path, [{"step": 9}])
    assert jsonl.read(path) == ROWS and os.listdir(tmp_path) == ["r.jsonl"]


def test_a_failed_append_adds_nothing(tmp_path):
    path = str(tmp_path / "m.jsonl")
    jsonl.append(path, ROWS[:1])
    with pytest.raises(TypeError):
        jsonl.append(path, [{"step": 2}, {"bad": Unwritable()}])
    assert jsonl.read(path) == ROWS[:1]


def test_an_append_that_fails_on_disk_leaves_no_partial_line(tmp_path, monkeypatch):
    """A full disk mid-append (the first bytes written, then ENOSPC): the file is cut back to what it
    held, and the error is one line naming the file."""
    import errno

    path = str(tmp_path / "m.jsonl")
    jsonl.append(path, ROWS[:1])
    size = os.path.getsize(path)
    real = os.write

    def short_then_full(fd, data):
        if len(data) > 8:
            return real(fd, bytes(data[:8]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(faults.WriteFailed, match=r"cannot append to .*m.jsonl: No space left on device"):
        jsonl.append(path, ROWS[1:])
    monkeypatch.undo()
    assert os.path.getsize(path) == size and jsonl.read(path) == ROWS[:1]
