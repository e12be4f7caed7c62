"""Where rows come from: the bundled samples, local .jsonl/.json/.csv/.parquet files, or a Hub dataset.

Every reader yields `RawRow(where, number, value)`: `where` names the file (or `hub-id[split]`), `number` is the
1-based row (for .jsonl the line number, blank lines counted; for .csv the data row, header excluded), and
`value` is the decoded row, or a `BadRow` when the row itself could not be decoded (bad JSON, bad UTF-8, not an
object). Column checks happen later (templates.py) so every error names file, row and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..config import ConfigError

BUNDLED = {
    "bundled": "instruct_v3_sample.jsonl",
    "bundled-alpaca": "alpaca_sample.jsonl",
    "bundled-chat": "chat_sample.jsonl",
}
LOCAL_TYPES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ConfigError):
    """A user error in the data (file, row, column named in the message)."""


class BadRow(DataError):
    """One malformed row; `reason` is the counter name used when data.skip_bad_rows is on."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class RawRow:
    where: str
    number: int
    value: Any  # dict, or a BadRow


@dataclass
class Source:
    """A resolved source: a display name, how to identify its content for the cache, and a row iterator."""
    name: str
    kind: str  # bundled | file | hub
    path: Optional[str] = None
    split: Optional[str] = None
    dataset: Any = None  # a datasets.Dataset for hub sources

    def fingerprint(self) -> str:
        if self.kind in ("bundled", "file"):
            st = os.stat(self.path)
            if self.kind == "bundled" or st.st_size < (64 << 20):
                with open(self.path, "rb") as fh:  # small files: hash the content (robust to touch/copies)
                    return "sha256:" + hashlib.sha256(fh.read()).hexdigest()
            return f"stat:{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}"
        fp = getattr(self.dataset, "_fingerprint", None)
        return f"hub:{self.name}:{fp or len(self.dataset)}"

    def rows(self) -> Iterator[RawRow]:
        if self.kind == "hub":
            where = self.name
            for i, row in enumerate(self.dataset):
                yield RawRow(where, i + 1, dict(row))
            return
        yield from read_local(self.path)


def bundled_path(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", BUNDLED[name])


def _local_source(path: str, option: str) -> Source:
    if not os.path.exists(path):
        raise DataError(f"{option}: file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{option}: {path} is a directory; give a .jsonl, .json, .csv or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_TYPES:
        raise DataError(f"{option}: {path}: unsupported file type {ext or '(none)'!r}; "
                        f"use one of {', '.join(LOCAL_TYPES)}")
    return Source(name=path, kind="file", path=path)


def _hub_source(source: str, split: str, option: str) -> Source:
    """`datasets.load_dataset(source, split=split)`; a local dataset directory or script works the same way."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{option}: the `datasets` package is needed for Hub dataset {source!r}") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing split, bad id: all user-facing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{option}: cannot load Hub dataset {source!r} split {split!r} ({first})") from None
    return Source(name=f"{source}[{split}]", kind="hub", split=split, dataset=ds)


def resolve_sources(data_cfg) -> tuple[Source, Optional[Source]]:
    """(train source, eval source or None) from the data config. Raises DataError for missing files etc."""
    if data_cfg.path:
        train = _local_source(data_cfg.path, "data.path")
        hub_id = None
    elif data_cfg.source in BUNDLED:
        train = Source(name=data_cfg.source, kind="bundled", path=bundled_path(data_cfg.source))
        hub_id = None
    elif data_cfg.source:
        src = data_cfg.source
        if os.path.isfile(src) or os.path.splitext(src)[1].lower() in LOCAL_TYPES:
            # a data file name (even a missing one) is never a Hub id: no network round trips for a typo
            train, hub_id = _local_source(src, "data.source"), None
        else:
            train, hub_id = _hub_source(src, data_cfg.train_split, "data.source"), src
    else:
        raise DataError("data.source and data.path are both empty: set one (e.g. --data.source bundled "
                        "or --data.path rows.jsonl)")
    ev = None
    if data_cfg.eval_split:
        if os.path.isfile(data_cfg.eval_split) or os.path.splitext(data_cfg.eval_split)[1].lower() in LOCAL_TYPES:
            ev = _local_source(data_cfg.eval_split, "data.eval_split")
        elif hub_id is not None:
            ev = _hub_source(hub_id, data_cfg.eval_split, "data.eval_split")
        else:
            raise DataError(f"data.eval_split: {data_cfg.eval_split!r} is neither a file nor a split of a Hub "
                            f"dataset (local and bundled data have no named splits; leave it empty to hold "
                            f"out data.eval_fraction of the rows)")
    return train, ev


# --------------------------------------------------------------------------------------------------
# local readers
# --------------------------------------------------------------------------------------------------


def read_local(path: str) -> Iterator[RawRow]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        yield from _read_jsonl(path)
    elif ext == ".json":
        yield from _read_json(path)
    elif ext == ".csv":
        yield from _read_csv(path)
    elif ext == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(LOCAL_TYPES)}")


def _decode_json_line(path: str, number: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("bad_line", f"{path}: row {number}: line is not valid UTF-8 (byte {e.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow("bad_line", f"{path}: row {number}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(value, dict):
        return BadRow("not_object", f"{path}: row {number}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_jsonl(path: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors write one) is not part of row 1
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            yield RawRow(path, number, _decode_json_line(path, number, raw.rstrip(b"\r\n")))


def _read_json(path: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        value = json.loads(raw.decode("utf-8-sig"))  # -sig: a leading byte-order mark is not content
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        # Hub-style "JSON lines in a .json file": fall back to line-by-line reading.
        if e.msg.startswith("Extra data"):
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} / {"train": [...]}
            value = lists[0]
        else:
            yield RawRow(path, 1, value)  # one object = one row
            return
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            item = BadRow("not_object", f"{path}: row {i + 1}: expected a JSON object, got {type(item).__name__}")
        yield RawRow(path, i + 1, item)


def _read_csv(path: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    # the default limit (128 KiB per field) rejected long responses (whole documents, code files) with a traceback
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    number, header = 0, None
    try:
        header = next(reader, None)
        if header is None:
            return
        for number, fields in enumerate(reader, start=1):
            if not fields:
                continue
            if len(fields) != len(header):
                yield RawRow(path, number, BadRow(
                    "bad_line", f"{path}: row {number}: has {len(fields)} fields, the header has {len(header)}"))
                continue
            yield RawRow(path, number, dict(zip(header, fields)))
    except csv.Error as e:  # the file cannot be parsed past this record
        where = "the header" if header is None else f"row {number + 1}"
        raise DataError(f"{path}: {where}: cannot parse CSV ({e})") from None


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for i, row in enumerate(table.to_pylist()):
        yield RawRow(path, i + 1, row)
