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
import stat
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
    dataset: Any = None  # a datasets.Dataset (or IterableDataset when streaming) for hub sources
    stream_fp: Optional[str] = None  # streaming: the builder's hash (changes with the Hub revision / files)

    def fingerprint(self) -> str:
        if self.kind in ("bundled", "file"):
            st = os.stat(self.path)
            if self.kind == "bundled" or st.st_size < (64 << 20):
                with open(self.path, "rb") as fh:  # small files: hash the content (robust to touch/copies)
                    return "sha256:" + hashlib.sha256(fh.read()).hexdigest()
            return f"stat:{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}"
        if self.stream_fp is not None:
            return f"hub-stream:{self.name}:{self.stream_fp}"
        fp = getattr(self.dataset, "_fingerprint", None)
        return f"hub:{self.name}:{fp or len(self.dataset)}"

    def column_names(self) -> Optional[list]:
        """The columns a Hub dataset declares (None when a stream does not know them before reading)."""
        names = getattr(self.dataset, "column_names", None) if self.kind == "hub" else None
        return list(names) if names else None

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
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO, device or socket: read twice (hash, rows) it hangs
        raise DataError(f"{option}: {path} is not a regular file (a pipe, device or socket); mixtune reads "
                        f"the data twice (to key its cache, then the rows): save it to a file first")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_TYPES:
        raise DataError(f"{option}: {path}: unsupported file type {ext or '(none)'!r}; "
                        f"use one of {', '.join(LOCAL_TYPES)}")
    return Source(name=path, kind="file", path=path)


def _hub_source(source: str, split: str, option: str, streaming: bool = False) -> Source:
    """`datasets.load_dataset(source, split=split)`; a local dataset directory or script works the same way.
    streaming: an IterableDataset, read row by row as the rows are needed (nothing downloaded whole)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{option}: the `datasets` package is needed for Hub dataset {source!r}") from None
    stream_fp = None
    try:
        ds = datasets.load_dataset(source, split=split, streaming=streaming)
        if streaming:
            stream_fp = datasets.load_dataset_builder(source).hash
    except Exception as e:  # noqa: BLE001 - network, missing split, bad id: all user-facing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{option}: cannot load Hub dataset {source!r} split {split!r} ({first})") from None
    return Source(name=f"{source}[{split}]", kind="hub", split=split, dataset=ds, stream_fp=stream_fp)


def resolve_source(source: str, path: str, split: str, streaming: bool, option: str) -> tuple[Source, Optional[str]]:
    """One train source -> (Source, its Hub id or None). `option` names the key in errors."""
    if path:
        return _local_source(path, f"{option}path"), None
    if source in BUNDLED:
        return Source(name=source, kind="bundled", path=bundled_path(source)), None
    if source:
        if os.path.exists(source) and not os.path.isdir(source) or \
                os.path.splitext(source)[1].lower() in LOCAL_TYPES:
            # a data file name (even a missing one) is never a Hub id: no network round trips for a typo
            return _local_source(source, f"{option}source"), None
        return _hub_source(source, split, f"{option}source", streaming), source
    raise DataError(f"{option}source and {option}path are both empty: set one (e.g. --data.source bundled "
                    f"or --data.path rows.jsonl)")


def resolve_sources(data_cfg) -> tuple[Source, Optional[Source]]:
    """(train source, eval source or None) from the data config. Raises DataError for missing files etc."""
    train, hub_id = resolve_source(data_cfg.source, data_cfg.path, data_cfg.train_split,
                                   getattr(data_cfg, "streaming", False), "data.")
    ev = None
    if data_cfg.eval_split:
        if os.path.isfile(data_cfg.eval_split) or os.path.splitext(data_cfg.eval_split)[1].lower() in LOCAL_TYPES:
            ev = _local_source(data_cfg.eval_split, "data.eval_split")
        elif hub_id is not None:
            ev = _hub_source(hub_id, data_cfg.eval_split, "data.eval_split", getattr(data_cfg, "streaming", False))
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key twice in one object is an error (json.loads would keep the last)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _Flagged(dict):
    """An object that had a duplicate key (the .json reader's second pass finds which row holds it)."""
    dup_key: Optional[str] = None


def _flag_duplicates(pairs: list) -> dict:
    out = _Flagged()
    for k, v in pairs:
        if k in out and out.dup_key is None:
            out.dup_key = k
        out[k] = v
    return out


def _find_flagged(value: Any) -> Optional[str]:
    if isinstance(value, _Flagged) and value.dup_key is not None:
        return value.dup_key
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for v in children:
        k = _find_flagged(v)
        if k is not None:
            return k
    return None


def _duplicate_row(path: str, number: int, key: str) -> BadRow:
    return BadRow("duplicate_key", f"{path}: row {number}: duplicate key {key!r} in one JSON object (only one "
                                   f"value can be meant; JSON readers silently keep the last)")


def _decode_json_line(path: str, number: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("bad_line", f"{path}: row {number}: line is not valid UTF-8 (byte {e.start})")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        return _duplicate_row(path, number, e.key)
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
        value = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_flag_duplicates)  # -sig: BOM is no content
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
        if len(lists) == 1 and getattr(value, "dup_key", None) is None:  # {"data": [...]} / {"train": [...]}
            value = lists[0]
        else:
            dup = _find_flagged(value)
            yield RawRow(path, 1, _duplicate_row(path, 1, dup) if dup is not None else dict(value))  # one row
            return
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            item = BadRow("not_object", f"{path}: row {i + 1}: expected a JSON object, got {type(item).__name__}")
        else:
            dup = _find_flagged(item)
            item = _duplicate_row(path, i + 1, dup) if dup is not None else item
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
        seen: dict = {}
        for k, name in enumerate(header, start=1):
            if name in seen:
                raise DataError(f"{path}: header: duplicate column name {name!r} (columns {seen[name]} and {k}); "
                                f"each row would keep only the last one's value: rename one")
            seen[name] = k
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
