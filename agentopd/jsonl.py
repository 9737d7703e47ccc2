"""JSON-lines files, one JSON object per line: metrics, samples, eval results, problem sets.

:func:`read` (and :func:`numbered`, with the line numbers) gives a file's rows; :func:`append`
adds rows at the end in one flushed write, so a crash while appending loses at most the line being
written: a *torn* last line, which :func:`read` drops where the caller asks; :func:`write`
replaces a file atomically (a temporary file, then ``os.replace``), so a crash leaves the old
file or the new one, never a part of either. A write that fails (a full disk) leaves the file as
it was, no temporary file and no partial line, and raises :class:`agentopd.faults.WriteFailed`
(one line: the path, the cause, the free space). Rows are written with ``json.dumps``'s defaults.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings

from agentopd import faults


class JSONLError(ValueError):
    """A JSON-lines file that cannot be read; the message names the file, and the line where it
    is one line that is wrong."""


def read(path: str, *, skip_torn_last: bool = False, skip_unreadable: bool = False) -> list[dict]:
    """The rows of ``path``, as :func:`numbered` reads them."""
    return [row for _, row in _rows(path, skip_torn_last, skip_unreadable)]


def numbered(path: str, *, skip_torn_last: bool = False, skip_unreadable: bool = False) -> list[tuple[int, dict]]:
    """``(line number, row)`` for each row of ``path`` (a ``.gz`` file is read decompressed); blank
    lines are skipped. A line that is not a JSON object raises JSONLError naming ``path:line``,
    unless it is dropped with a warning: the last non-blank line with ``skip_torn_last`` (a run
    stopped while appending it), any line with ``skip_unreadable``."""
    return _rows(path, skip_torn_last, skip_unreadable)


def append(path: str, rows: list[dict]) -> None:
    """Add ``rows`` at the end of ``path`` (made if missing) in one write, flushed to the system
    on return: a crash loses at most the line being written. A failed write is undone (the file
    cut back to its old length) and raises :class:`agentopd.faults.WriteFailed`."""
    data = _text(rows).encode("utf-8")  # a row json cannot write raises before the file is touched
    with faults.writing(path, len(data), "append to"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def write(path: str, rows: list[dict]) -> None:
    """Make ``path`` hold exactly ``rows``, atomically: they go to ``path + ".tmp"``, which then
    replaces ``path``; a failure leaves ``path`` as it was and no temporary file (and raises
    :class:`agentopd.faults.WriteFailed`)."""
    faults.write_text(path, _text(rows))


def _text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _lines(path: str) -> list[str]:
    """The lines of ``path``, or JSONLError saying why not."""
    if not os.path.exists(path):
        raise JSONLError(f"{path}: no such file")
    if os.path.isdir(path):
        raise JSONLError(f"{path}: is a directory, not a JSONL file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return list(f)
    except UnicodeDecodeError as e:
        raise JSONLError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise JSONLError(f"{path}: cannot read it ({e})") from None


def _row(line: str) -> dict:
    """The JSON object on ``line``, or JSONLError saying why not (without the file and line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise JSONLError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise JSONLError(f"expected a JSON object, got {type(row).__name__}")
    return row


def _rows(path: str, skip_torn_last: bool, skip_unreadable: bool) -> list[tuple[int, dict]]:
    """:func:`numbered`'s answer; its warnings name the line that called :func:`read` or :func:`numbered`."""
    lines = _lines(path)
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows, dropped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, _row(line)))
        except JSONLError as e:
            if not (skip_unreadable or skip_torn_last and n == last):
                raise JSONLError(f"{path}:{n}: {e}") from None
            dropped.append(n)
    if skip_unreadable and dropped:
        warnings.warn(f"{path}: {len(dropped)} unreadable line(s) dropped (line {', '.join(map(str, dropped))})",
                      stacklevel=3)
    elif dropped:
        warnings.warn(f"{path}: the last line is incomplete (a run stopped while writing it); it is dropped",
                      stacklevel=3)
    return rows
