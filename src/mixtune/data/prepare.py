"""Data preparation end to end: read -> validate -> hold out -> format -> tokenize -> pack -> cache -> stats.

    prepared = prepare_data(cfg, tokenizer)    # .train_rows .eval_rows .eval_examples .stats
    stats = prepare_main(cfg, json_out=False, dump_text=None, dump_tokens=None)   # `mixtune prepare`

The result is cached on disk under `<data.cache_dir>/<key>.pt`, keyed by the data settings that change the
result, the source's content (file hash, or size+mtime for files over 64 MiB; the dataset fingerprint for the
Hub), the tokenizer's identity and a hash of this package's code, so a second identical run only loads tensors
(`stats["cached"]` is true).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .packing import pack_examples, single_rows
from .sources import BadRow, DataError, resolve_sources
from .templates import TEMPLATES, column_map, detect_schema, render_example, to_conversation
from .tokenize import IGNORE, fit_length, tokenize_example

CACHE_FORMAT = 2
_KEY_FIELDS = ("source", "path", "train_split", "eval_split", "eval_fraction", "eval_max_rows", "max_rows",
               "template", "columns", "train_on_prompt", "max_seq_length", "packing", "overlong",
               "skip_bad_rows", "seed")


@dataclass
class PreparedData:
    train_rows: list
    eval_rows: list
    eval_examples: list   # [{"prompt": str, "reference": str, "prompt_ids": [int]}]
    stats: dict
    # Every valid example in source order, [(text, Tokenized)], only when freshly built (not from cache).
    examples: Optional[list] = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def _code_version() -> str:
    import mixtune

    h = hashlib.sha256(str(getattr(mixtune, "__version__", "0")).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as fh:
                h.update(name.encode() + fh.read())
    return h.hexdigest()[:16]


def cache_dir(cfg) -> str:
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    base = cfg.model.cache_dir or os.environ.get("MIXTUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mixtune")
    return os.path.join(base, "data")


def cache_key(cfg, train_src, eval_src, tokenizer) -> str:
    d = cfg.data
    parts = {k: getattr(d, k) for k in _KEY_FIELDS}
    if parts["path"]:
        parts["path"] = os.path.abspath(parts["path"])
    parts["train_fp"] = train_src.fingerprint()
    parts["eval_fp"] = eval_src.fingerprint() if eval_src is not None else None
    parts["tokenizer"] = tokenizer.identity()
    parts["code"] = _code_version()
    parts["format"] = CACHE_FORMAT
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _flatten(rows: list) -> dict:
    if not rows:
        return {"lengths": torch.zeros(0, dtype=torch.long)}
    return {"lengths": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long),
            # int32 on disk (ids < 2**31): half the size of int64; widened back on load
            **{k: torch.cat([r[k] for r in rows]).to(torch.int32) for k in ("input_ids", "labels", "position_ids")}}


def _unflatten(flat: dict) -> list:
    lengths = flat["lengths"].tolist()
    if not lengths:
        return []
    split = {k: torch.split(flat[k].long(), lengths) for k in ("input_ids", "labels", "position_ids")}
    return [{k: split[k][i] for k in split} for i in range(len(lengths))]


def _save_cache(path: str, prepared: PreparedData) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"format": CACHE_FORMAT, "train": _flatten(prepared.train_rows),
                "eval": _flatten(prepared.eval_rows), "eval_examples": prepared.eval_examples,
                "stats": prepared.stats}, tmp)
    os.replace(tmp, path)


def _load_cache(path: str) -> Optional[PreparedData]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt or foreign cache file is rebuilt, never fatal
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        return None
    return PreparedData(_unflatten(blob["train"]), _unflatten(blob["eval"]), blob["eval_examples"],
                        dict(blob["stats"]))


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------


def _read_records(src, data_cfg, tokenizer, counts: dict, bad_msgs: list, limit: int = 0) -> tuple[list, str]:
    """Valid rows of one source as [(text, Example, Conversation)] in source order, and the schema name."""
    raw = []
    for r in src.rows():
        raw.append(r)
        if limit and len(raw) >= limit:
            break
    if src.kind == "hub":
        columns = set(src.dataset.column_names)
    else:
        columns = set()
        for r in raw:
            if isinstance(r.value, dict):
                columns.update(r.value.keys())
    cmap = column_map(data_cfg.columns)
    if not raw:
        raise DataError(f"{src.name}: no rows")
    if not columns:  # not one row decoded: its own error says why (not "no known columns")
        bad = [r.value for r in raw if isinstance(r.value, BadRow)]
        if bad and not data_cfg.skip_bad_rows:
            raise DataError(f"{bad[0]} (set --data.skip_bad_rows true to skip and count bad rows)")
        if bad:
            reasons = {}
            for b in bad:
                reasons[b.reason] = reasons.get(b.reason, 0) + 1
            raise DataError(f"{src.name}: all {len(bad)} rows are bad {dict(sorted(reasons.items()))}; the "
                            f"first: {bad[0]}")
    first_row = next((r.number for r in raw if isinstance(r.value, dict)), 1)
    schema = detect_schema(columns, cmap, src.name, first_row)
    out = []
    for r in raw:
        try:
            if isinstance(r.value, BadRow):
                raise r.value
            conv = to_conversation(r.value, schema, cmap, r.where, r.number)
        except BadRow as e:
            if not data_cfg.skip_bad_rows:
                raise DataError(f"{e} (set --data.skip_bad_rows true to skip and count bad rows)") from None
            counts[e.reason] = counts.get(e.reason, 0) + 1
            if len(bad_msgs) < 5:
                bad_msgs.append(str(e))
            continue
        ex = render_example(data_cfg.template, conv, data_cfg.train_on_prompt, tokenizer)
        out.append(ex)
    return out, schema


def _percentiles(lengths: list) -> dict:
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    s = sorted(lengths)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def _build(cfg, tokenizer, train_src, eval_src) -> PreparedData:
    d = cfg.data
    counts: dict = {}
    bad_msgs: list = []
    train_ex, schema = _read_records(train_src, d, tokenizer, counts, bad_msgs, d.max_rows)
    n_read_valid = len(train_ex)
    order = list(range(len(train_ex)))
    if eval_src is not None:
        eval_ex, _ = _read_records(eval_src, d, tokenizer, counts, bad_msgs)
        n_read_valid += len(eval_ex)  # read, whether or not eval_max_rows keeps them all
        eval_how = eval_src.name
        eval_idx: list = []
    else:
        eval_ex, eval_how = [], "held out"
        n_eval = 0
        if d.eval_fraction > 0 and len(train_ex) >= 2:
            n_eval = min(len(train_ex) - 1, max(1, round(d.eval_fraction * len(train_ex))))
        g = torch.Generator().manual_seed(int(d.seed))
        eval_idx = sorted(torch.randperm(len(train_ex), generator=g)[:n_eval].tolist())
        held = set(eval_idx)
        eval_ex = [train_ex[i] for i in eval_idx]
        order = [i for i in range(len(train_ex)) if i not in held]
    if 0 < d.eval_max_rows < len(eval_ex):
        # a seeded sample kept in source order, not the first rows: a split sorted by source (instruct-v3 mixes
        # several) would otherwise be evaluated on whichever source comes first
        g = torch.Generator().manual_seed(int(d.seed) + 1)
        keep = sorted(torch.randperm(len(eval_ex), generator=g)[: d.eval_max_rows].tolist())
        eval_ex = [eval_ex[i] for i in keep]
    all_ex = train_ex + (eval_ex if eval_src is not None else [])
    toks = [tokenize_example(ex, tokenizer) for ex in all_ex]  # source order (train file, then eval file)
    tok_of = {id(ex): t for ex, t in zip(all_ex, toks)}

    def fit(exs):
        kept, dropped, truncated, no_label = [], 0, 0, 0
        for ex in exs:
            t = fit_length(tok_of[id(ex)], d.max_seq_length, d.overlong)
            if t is None:
                dropped += 1
                continue
            if t.truncated and all(x == IGNORE for x in t.labels):
                no_label += 1  # truncation cut the whole answer: a full row of compute with nothing to learn
                continue
            truncated += t.truncated
            kept.append((t.input_ids, t.labels))
        return kept, dropped, truncated, no_label

    train_kept, train_dropped, train_trunc, train_nolab = fit([train_ex[i] for i in order])
    eval_kept, eval_dropped, eval_trunc, eval_nolab = fit(eval_ex)
    if not train_kept:
        raise DataError(f"{train_src.name}: no training examples left ({sum(counts.values())} bad rows, "
                        f"{train_dropped} longer than data.max_seq_length={d.max_seq_length} dropped, "
                        f"{train_nolab} truncated to no answer token)")
    pack = (lambda exs: pack_examples(exs, d.max_seq_length, tokenizer.pad_id)) if d.packing else single_rows
    train_rows, pstats = pack(train_kept)
    eval_rows, estats = pack(eval_kept) if eval_kept else ([], {"rows": 0, "real_tokens": 0})
    lengths = [len(tok_of[id(train_ex[i])].input_ids) for i in order]
    eval_examples = [{"prompt": ex.prompt, "reference": ex.reference,
                      "prompt_ids": tok_of[id(ex)].prompt_ids} for ex in eval_ex]
    stats = {
        "source": train_src.name, "schema": schema, "template": d.template, "tokenizer": tokenizer.name,
        "train_on_prompt": d.train_on_prompt,
        "rows_read": n_read_valid + sum(counts.values()),
        "rows_bad": sum(counts.values()), "rows_bad_by_reason": dict(sorted(counts.items())),
        "bad_row_examples": bad_msgs,
        "train_examples": len(train_kept), "eval_examples": len(eval_kept), "eval_from": eval_how,
        "eval_seed": d.seed if eval_src is None else None,
        "dropped_overlong": train_dropped + eval_dropped, "truncated": train_trunc + eval_trunc,
        "dropped_no_labels": train_nolab + eval_nolab,
        "overlong": d.overlong, "max_seq_length": d.max_seq_length,
        "tokens": pstats["real_tokens"], "label_tokens": sum(sum(1 for x in lab if x != IGNORE)
                                                            for _, lab in train_kept),
        "eval_tokens": estats["real_tokens"],
        "length": _percentiles(lengths),
        "packing": d.packing, "train_rows": pstats["rows"], "eval_rows": estats["rows"],
        "packing_efficiency": pstats.get("packing_efficiency"), "examples_per_row": pstats.get("examples_per_row"),
    }
    examples = [(ex.text, t) for ex, t in zip(all_ex, toks)]
    return PreparedData(train_rows, eval_rows, eval_examples, stats, examples)


def prepare_data(cfg, tokenizer, *, use_cache: bool = True) -> PreparedData:
    """Read, format, tokenize and pack `cfg.data` with `tokenizer` (cached on disk; see the module doc).

    Rows are dicts of LongTensors (T,) `input_ids`, `labels` (unshifted, -100 masked), `position_ids`
    (restarting at 0 per example). Packed rows have T = data.max_seq_length; unpacked rows are single
    examples of their own length (iterate_batches pads each batch to its longest row).
    """
    t0 = time.time()
    if cfg.data.template not in TEMPLATES:
        raise DataError(f"data.template: unknown template {cfg.data.template!r}; choose one of "
                        f"{', '.join(TEMPLATES)}")
    for name in ("max_rows", "eval_max_rows"):  # 0 = no cap; a negative cap read one row ("limit" is truthy)
        if getattr(cfg.data, name) < 0:
            raise DataError(f"data.{name}: must be 0 (no cap) or positive, got {getattr(cfg.data, name)}")
    train_src, eval_src = resolve_sources(cfg.data)
    path = os.path.join(cache_dir(cfg), cache_key(cfg, train_src, eval_src, tokenizer) + ".pt")
    if use_cache and os.path.isfile(path):
        hit = _load_cache(path)
        if hit is not None:
            hit.stats.update(cached=True, cache_path=path, seconds=round(time.time() - t0, 3))
            return hit
    prepared = _build(cfg, tokenizer, train_src, eval_src)
    prepared.stats.update(cached=False, cache_path=path)
    try:
        _save_cache(path, prepared)
    except OSError as e:  # an unwritable cache slows the next run down; it is not an error
        prepared.stats["cache_path"] = None
        print(f"warning: could not write the data cache {path} ({e})", file=sys.stderr)
    prepared.stats["seconds"] = round(time.time() - t0, 3)
    return prepared


# --------------------------------------------------------------------------------------------------
# `mixtune prepare`
# --------------------------------------------------------------------------------------------------


def _tokenizer_for(cfg):
    from .tokenizer import load_tokenizer

    name = cfg.model.name_or_path
    return load_tokenizer(cfg.model.tokenizer, model_dir=name or None)


def _write_dumps(prepared: PreparedData, dump_text: Optional[str], dump_tokens: Optional[str]) -> None:
    for path in (dump_text, dump_tokens):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if dump_text:
        with open(dump_text, "w", encoding="utf-8") as fh:
            for text, _ in prepared.examples:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    if dump_tokens:
        with open(dump_tokens, "w", encoding="utf-8") as fh:
            for _, t in prepared.examples:
                fh.write(json.dumps({"input_ids": t.input_ids, "labels": t.labels}) + "\n")


def format_stats(s: dict) -> str:
    """The human-readable `mixtune prepare` report."""
    L = s["length"]
    eff = s["packing_efficiency"]
    lines = [
        f"data: {s['source']} ({s['schema']} schema) -> template {s['template']}, tokenizer {s['tokenizer']}"
        + ("  [cached]" if s.get("cached") else ""),
        f"  rows read         {s['rows_read']:,}",
        f"  bad rows          {s['rows_bad']:,}" + (f"  {s['rows_bad_by_reason']}" if s["rows_bad"] else ""),
        f"  train / eval      {s['train_examples']:,} / {s['eval_examples']:,} examples (eval: {s['eval_from']}"
        + (f", seed {s['eval_seed']}" if s.get("eval_seed") is not None else "") + ")",
        f"  overlong (>{s['max_seq_length']})  {s['truncated']:,} truncated, {s['dropped_overlong']:,} dropped"
        + (f", {s['dropped_no_labels']:,} dropped (truncation left no answer token)"
           if s.get("dropped_no_labels") else ""),
        f"  train tokens      {s['tokens']:,} ({s['label_tokens']:,} with loss"
        + (", whole text)" if s["train_on_prompt"] else ", answers + eos)"),
        f"  example length    p50 {L['p50']}  p90 {L['p90']}  p99 {L['p99']}  max {L['max']}  mean {L['mean']}",
    ]
    if s["packing"]:
        lines.append(f"  packed rows       {s['train_rows']:,} x {s['max_seq_length']} (eval {s['eval_rows']:,}), "
                     f"efficiency {eff * 100:.1f}%, {s['examples_per_row']} examples/row")
    else:
        lines.append(f"  rows              {s['train_rows']:,} unpacked (eval {s['eval_rows']:,})")
    for m in s.get("bad_row_examples") or []:
        lines.append(f"  skipped: {m}")
    lines.append(f"  cache             {s.get('cache_path')} ({'hit' if s.get('cached') else 'written'}, "
                 f"{s.get('seconds')} s)")
    return "\n".join(lines)


def prepare_main(cfg, *, json_out: bool = False, dump_text: Optional[str] = None,
                 dump_tokens: Optional[str] = None, tokenizer=None) -> dict:
    """`mixtune prepare`: prepare (or load from cache), print stats (one JSON line with json_out), write the
    dumps (one JSON line per example in source order: {"text"} / {"input_ids", "labels"}, unpacked,
    untruncated). Returns the stats."""
    for option, path in (("--dump-text", dump_text), ("--dump-tokens", dump_tokens)):
        if path and os.path.isdir(path):  # checked before preparing, which can take minutes on real data
            raise DataError(f"{option}: {path} is a directory; give a file name (e.g. {path.rstrip('/')}/out.jsonl)")
    tok = tokenizer if tokenizer is not None else _tokenizer_for(cfg)
    dumps = bool(dump_text or dump_tokens)
    prepared = prepare_data(cfg, tok, use_cache=not dumps)
    if dumps:
        _write_dumps(prepared, dump_text, dump_tokens)
    stats = prepared.stats
    if json_out:
        print(json.dumps(stats, ensure_ascii=False), flush=True)
    else:
        print(format_stats(stats), flush=True)
    return stats
