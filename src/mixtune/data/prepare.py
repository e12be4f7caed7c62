"""Data preparation end to end: read -> validate -> hold out -> format -> tokenize -> (mix) -> pack -> cache -> stats.

The data is one or more parts (mixture.py): data.source / data.path, or the entries of data.datasets, each read
with its own template and columns, held out, tokenized and fitted to data.max_seq_length, then mixed by weight
(stats["sources"]: rows and tokens per source). Raw text (data.template text) splits an overlong document into
rows instead of truncating it. When evaluation was asked for and there is none, a notice says why.

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

from .mixture import resolve_parts, select_by_weight
from .packing import pack_examples, single_rows
from .records import read_examples
from .sources import DataError
from .templates import TEMPLATES
from .tokenize import IGNORE, fit_length, split_document, tokenize_example

CACHE_FORMAT = 3
_KEY_FIELDS = ("source", "path", "train_split", "eval_split", "eval_fraction", "eval_max_rows", "max_rows",
               "template", "columns", "train_on_prompt", "max_seq_length", "packing", "overlong",
               "skip_bad_rows", "seed", "chat_template_kwargs", "datasets", "streaming", "mixture")


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


def cache_key(cfg, sources: list, tokenizer) -> str:
    """Every data.* setting that changes the result (data.datasets entries included), the content of every
    source (`sources`: the parts of mixture.resolve_parts), the tokenizer and this package's code."""
    d = cfg.data
    parts = {k: getattr(d, k, None) for k in _KEY_FIELDS}
    if parts["path"]:
        parts["path"] = os.path.abspath(parts["path"])
    parts["sources"] = [[p.train.fingerprint(), p.eval.fingerprint() if p.eval is not None else None,
                         p.template, p.columns, p.weight, p.max_rows] for p in sources]
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


def _percentiles(lengths: list) -> dict:
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    s = sorted(lengths)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


@dataclass
class _PartData:
    """One part read, held out, tokenized and fitted to data.max_seq_length."""
    schema: str
    counts: dict                 # bad rows by reason
    read: list                   # every valid Example in source order (train file, then eval file)
    train_ex: list               # those kept for training (held-out ones removed)
    eval_ex: list
    eval_note: str = ""          # why there is no evaluation data ("" when there is)
    tok_of: dict = field(default_factory=dict)
    train_kept: list = field(default_factory=list)  # [(ids, labels)] after fit_length
    eval_kept: list = field(default_factory=list)
    eval_kept_idx: list = field(default_factory=list)  # eval_kept[j] is eval_ex[eval_kept_idx[j]]
    eval_records: list = field(default_factory=list)
    fit: dict = field(default_factory=dict)


def _read_part(part, k: int, d, tokenizer, bad_msgs: list) -> _PartData:
    counts: dict = {}
    train_ex, schema = read_examples(part.train, template=part.template, columns=part.columns, data_cfg=d,
                                     tokenizer=tokenizer, counts=counts, bad_msgs=bad_msgs, limit=part.max_rows)
    if part.eval is not None:
        eval_ex, _ = read_examples(part.eval, template=part.template, columns=part.columns, data_cfg=d,
                                   tokenizer=tokenizer, counts=counts, bad_msgs=bad_msgs)
        note = "" if eval_ex else f"{part.eval.name} has no valid rows"
        return _PartData(schema, counts, train_ex + eval_ex, train_ex, eval_ex, note)
    n_eval, note = 0, ""
    if d.eval_fraction > 0 and len(train_ex) >= 2:
        n_eval = min(len(train_ex) - 1, max(1, round(d.eval_fraction * len(train_ex))))
    elif d.eval_fraction > 0:
        note = (f"{part.train.name} has {len(train_ex)} usable row{'s' if len(train_ex) != 1 else ''}: "
                f"data.eval_fraction {d.eval_fraction:g} holds out none (one row must stay for training); add "
                f"rows or give an evaluation file with data.eval_split")
    else:
        note = "data.eval_fraction is 0 and no data.eval_split is set (set one to evaluate)"
    g = torch.Generator().manual_seed(int(d.seed) + 7919 * k)  # part 0: data.seed, as a single source always was
    eval_idx = sorted(torch.randperm(len(train_ex), generator=g)[:n_eval].tolist())
    held = set(eval_idx)
    return _PartData(schema, counts, train_ex, [e for i, e in enumerate(train_ex) if i not in held],
                     [train_ex[i] for i in eval_idx], note)


def _fit(toks: list, d, split: bool = False) -> tuple[list, dict, list]:
    """-> ([(ids, labels)] of the examples that fit, counts, their indices in `toks`). split (raw text): an
    overlong document is split into max_seq_length pieces instead of data.overlong's truncate / drop."""
    kept, c, idx = [], {"dropped": 0, "truncated": 0, "no_label": 0, "split": 0}, []
    for n, tok in enumerate(toks):
        if split and len(tok.input_ids) > d.max_seq_length:
            pieces = split_document(tok, d.max_seq_length)
            c["split"] += 1
            kept += [(t.input_ids, t.labels) for t in pieces]
            idx += [n] * len(pieces)
            continue
        t = fit_length(tok, d.max_seq_length, d.overlong)
        if t is None:
            c["dropped"] += 1
            continue
        if t.truncated and all(x == IGNORE for x in t.labels):
            c["no_label"] += 1  # truncation cut the whole answer: a full row of compute with nothing to learn
            continue
        c["truncated"] += t.truncated
        kept.append((t.input_ids, t.labels))
        idx.append(n)
    return kept, c, idx


def _sample_eval(items: list, d) -> list:
    if 0 < d.eval_max_rows < len(items):
        # a seeded sample kept in source order, not the first rows: a split sorted by source (instruct-v3 mixes
        # several) would otherwise be evaluated on whichever source comes first
        g = torch.Generator().manual_seed(int(d.seed) + 1)
        keep = sorted(torch.randperm(len(items), generator=g)[: d.eval_max_rows].tolist())
        return [items[i] for i in keep]
    return items


def _prepare_part(part, k: int, d, tokenizer, bad_msgs: list, mixture: bool) -> _PartData:
    pd = _read_part(part, k, d, tokenizer, bad_msgs)
    if not mixture:  # a mixture samples its eval rows after mixing
        pd.eval_ex = _sample_eval(pd.eval_ex, d)
    pd.tok_of = {id(ex): tokenize_example(ex, tokenizer) for ex in pd.read}
    split = part.template == "text"
    pd.train_kept, ct, _ = _fit([pd.tok_of[id(ex)] for ex in pd.train_ex], d, split)
    pd.eval_kept, ce, pd.eval_kept_idx = _fit([pd.tok_of[id(ex)] for ex in pd.eval_ex], d, split)
    pd.fit = {"train": ct, "eval": ce}
    if pd.eval_ex and not pd.eval_kept:
        pd.eval_note = (f"all {len(pd.eval_ex)} held-out examples of {part.train.name} were dropped "
                        f"({ce['dropped']} longer than data.max_seq_length={d.max_seq_length} with data.overlong "
                        f"drop, {ce['no_label']} truncated to no answer token)")
    pd.eval_records = [{"prompt": ex.prompt, "reference": ex.reference, "prompt_ids": pd.tok_of[id(ex)].prompt_ids}
                       for ex in pd.eval_ex]
    if not pd.train_kept:
        raise DataError(f"{part.train.name}: no training examples left ({sum(pd.counts.values())} bad rows, "
                        f"{ct['dropped']} longer than data.max_seq_length={d.max_seq_length} dropped, "
                        f"{ct['no_label']} truncated to no answer token)")
    return pd


def _mix(parts: list, pds: list, d) -> tuple[list, list, list, list]:
    """-> (train [(ids, labels)], eval [(ids, labels)], eval records, per-part kept train indices)."""
    if len(parts) == 1:
        pd = pds[0]
        return pd.train_kept, pd.eval_kept, pd.eval_records, [list(range(len(pd.train_kept)))]
    weights = [p.weight for p in parts]
    keep_t, _ = select_by_weight([[len(i) for i, _ in pd.train_kept] for pd in pds], weights, d.seed,
                                 getattr(d, "mixture", "down"))
    keep_e, _ = select_by_weight([[len(i) for i, _ in pd.eval_kept] for pd in pds], weights, d.seed + 1)
    train = [pd.train_kept[i] for pd, keep in zip(pds, keep_t) for i in keep]
    evals = [(pd.eval_kept[i], k, i) for k, (pd, keep) in enumerate(zip(pds, keep_e)) for i in keep]
    evals = _sample_eval(evals, d)
    seen, records = set(), []
    for _, k, i in evals:  # one record per example (a split raw-text document has several kept pieces)
        j = pds[k].eval_kept_idx[i]
        if (k, j) not in seen:
            seen.add((k, j))
            records.append(pds[k].eval_records[j])
    return train, [e for e, _, _ in evals], records, keep_t


def _build(cfg, tokenizer, parts: list) -> PreparedData:
    d = cfg.data
    bad_msgs: list = []
    pds = [_prepare_part(part, k, d, tokenizer, bad_msgs, len(parts) > 1) for k, part in enumerate(parts)]
    train_kept, eval_kept, eval_records, keep_t = _mix(parts, pds, d)
    pack = (lambda exs: pack_examples(exs, d.max_seq_length, tokenizer.pad_id)) if d.packing else single_rows
    train_rows, pstats = pack(train_kept)
    eval_rows, estats = pack(eval_kept) if eval_kept else ([], {"rows": 0, "real_tokens": 0})
    counts: dict = {}
    for pd in pds:
        for key, v in pd.counts.items():
            counts[key] = counts.get(key, 0) + v
    fit = {key: sum(pd.fit["train"][key] + pd.fit["eval"][key] for pd in pds)
           for key in ("dropped", "truncated", "no_label", "split")}
    lengths = [len(pd.tok_of[id(ex)].input_ids) for pd in pds for ex in pd.train_ex]
    notes = [pd.eval_note for pd in pds if pd.eval_note]
    first = parts[0]
    mixture = len(parts) > 1
    stats = {
        "source": first.train.name if not mixture else f"mixture of {len(parts)}: "
                                                        + ", ".join(p.train.name for p in parts),
        "schema": pds[0].schema if not mixture else ",".join(pd.schema for pd in pds),
        "template": d.template if not mixture else ",".join(p.template for p in parts),
        "tokenizer": tokenizer.name, "train_on_prompt": d.train_on_prompt,
        "rows_read": sum(len(pd.read) for pd in pds) + sum(counts.values()),
        "rows_bad": sum(counts.values()), "rows_bad_by_reason": dict(sorted(counts.items())),
        "bad_row_examples": bad_msgs,
        "train_examples": len(train_kept), "eval_examples": len(eval_kept),
        "eval_from": first.eval.name if first.eval is not None and not mixture else "held out",
        "eval_seed": d.seed if first.eval is None else None,
        "eval_note": "" if eval_kept else ("; ".join(notes) or "no evaluation examples"),
        "dropped_overlong": fit["dropped"], "truncated": fit["truncated"], "dropped_no_labels": fit["no_label"],
        "split_documents": fit["split"],
        "overlong": d.overlong, "max_seq_length": d.max_seq_length,
        "tokens": pstats["real_tokens"],
        "label_tokens": sum(sum(1 for x in lab if x != IGNORE) for _, lab in train_kept),
        "eval_tokens": estats["real_tokens"],
        "length": _percentiles(lengths),
        "packing": d.packing, "train_rows": pstats["rows"], "eval_rows": estats["rows"],
        "packing_efficiency": pstats.get("packing_efficiency"), "examples_per_row": pstats.get("examples_per_row"),
    }
    if mixture:
        total = max(1, sum(len(pd.train_kept[i][0]) for pd, keep in zip(pds, keep_t) for i in keep))
        stats["sources"] = [{
            "name": p.train.name, "template": p.template, "schema": pd.schema, "weight": p.weight,
            "rows_read": len(pd.read) + sum(pd.counts.values()), "rows_bad": sum(pd.counts.values()),
            "train_examples": len(keep), "tokens": sum(len(pd.train_kept[i][0]) for i in keep),
            "token_share": round(sum(len(pd.train_kept[i][0]) for i in keep) / total, 4),
            "weight_share": round(p.weight / sum(q.weight for q in parts), 4),
        } for p, pd, keep in zip(parts, pds, keep_t)]
    examples = [(ex.text, pd.tok_of[id(ex)]) for pd in pds for ex in pd.read]
    return PreparedData(train_rows, eval_rows, eval_records, stats, examples)


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
    parts = resolve_parts(cfg.data)
    path = os.path.join(cache_dir(cfg), cache_key(cfg, parts, tokenizer) + ".pt")
    if use_cache and os.path.isfile(path):
        hit = _load_cache(path)
        if hit is not None:
            hit.stats.update(cached=True, cache_path=path, seconds=round(time.time() - t0, 3))
            _eval_notice(cfg, hit.stats)
            return hit
    prepared = _build(cfg, tokenizer, parts)
    prepared.stats.update(cached=False, cache_path=path)
    try:
        _save_cache(path, prepared)
    except OSError as e:  # an unwritable cache slows the next run down; it is not an error
        prepared.stats["cache_path"] = None
        print(f"warning: could not write the data cache {path} ({e})", file=sys.stderr)
    prepared.stats["seconds"] = round(time.time() - t0, 3)
    _eval_notice(cfg, prepared.stats)
    return prepared


def _eval_notice(cfg, stats: dict) -> None:
    """Evaluation was asked for (eval_fraction > 0 or an eval split) and there is none: say why, once."""
    if stats.get("eval_examples") or not (cfg.data.eval_fraction > 0 or cfg.data.eval_split):
        return
    print(f"mixtune: notice: no evaluation data: {stats.get('eval_note') or 'no evaluation examples'}; there "
          f"will be no evaluation loss", file=sys.stderr)


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
           if s.get("dropped_no_labels") else "")
        + (f", {s['split_documents']:,} raw-text documents split" if s.get("split_documents") else ""),
        f"  train tokens      {s['tokens']:,} ({s['label_tokens']:,} with loss"
        + (", whole text)" if s["train_on_prompt"] or s["template"] == "text" else ", answers + eos)"),
        f"  example length    p50 {L['p50']}  p90 {L['p90']}  p99 {L['p99']}  max {L['max']}  mean {L['mean']}",
    ]
    if s["packing"]:
        lines.append(f"  packed rows       {s['train_rows']:,} x {s['max_seq_length']} (eval {s['eval_rows']:,}), "
                     f"efficiency {eff * 100:.1f}%, {s['examples_per_row']} examples/row")
    else:
        lines.append(f"  rows              {s['train_rows']:,} unpacked (eval {s['eval_rows']:,})")
    for src in s.get("sources") or []:
        lines.append(f"  source            {src['name']} ({src['schema']} -> {src['template']}): weight "
                     f"{src['weight']:g} ({src['weight_share'] * 100:.1f}%), {src['rows_read']:,} rows read, "
                     f"{src['train_examples']:,} examples, {src['tokens']:,} tokens ({src['token_share'] * 100:.1f}%)")
    if not s["eval_examples"] and s.get("eval_note"):
        lines.append(f"  no eval           {s['eval_note']}")
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
