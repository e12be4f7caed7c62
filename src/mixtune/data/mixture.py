"""Dataset mixtures (`data.datasets`): several sources, each with its own format, mixed by weight.

    data:
      datasets:
        - {path: chat.jsonl, template: chat-template, weight: 3}
        - {source: org/corpus, template: text, columns: {text: body}, weight: 1, max_rows: 100000}

A weight is a share of the training tokens: source k gets w_k / sum(w) of them. With data.mixture down (the
default) no row is repeated: the source that is scarcest relative to its weight is used whole and every other
one contributes a seeded sample of whole examples up to its share (so the shares hold to within about one
example's length). With data.mixture up no row is dropped: the source most plentiful relative to its weight is
used whole and every other one is repeated whole as often as its share allows, then topped up with a seeded
sample. Evaluation rows are held out per source (data.eval_fraction, seeded) before the selection and mixed by
the same weights, sampled down (never repeated). Without `data.datasets`, the data is one part (data.source /
data.path) and nothing is sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .sources import DataError, Source, resolve_source

SPEC_KEYS = ("source", "path", "split", "template", "columns", "weight", "max_rows")


@dataclass
class Part:
    """One source of the data with its format: the single dataset, or one entry of data.datasets."""
    label: str                 # "data" or "data.datasets[k]" (names the key in errors)
    train: Source
    eval: Optional[Source]
    template: str
    columns: dict
    weight: float
    max_rows: int


def check_specs(specs: list) -> list:
    """Validate data.datasets entries before anything is read; DataError naming the entry and the key."""
    from .templates import TEMPLATES

    out = []
    for k, spec in enumerate(specs):
        at = f"data.datasets[{k}]"
        if not isinstance(spec, dict):
            raise DataError(f"{at}: expected a mapping like {{path: a.jsonl, weight: 1}}, got {spec!r}")
        bad = [key for key in spec if key not in SPEC_KEYS]
        if bad:
            raise DataError(f"{at}: unknown key {bad[0]!r}; keys are {', '.join(SPEC_KEYS)}")
        if bool(spec.get("source")) == bool(spec.get("path")):
            raise DataError(f"{at}: give exactly one of source (bundled name, Hub id, dataset dir) or path (a file)")
        w = spec.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataError(f"{at}: weight must be a number > 0 (its share of the training tokens), got {w!r}")
        template = spec.get("template")
        if template is not None and template not in TEMPLATES:
            raise DataError(f"{at}: template {template!r} is not one of {', '.join(TEMPLATES)}")
        cols = spec.get("columns", {})
        if not isinstance(cols, dict) or not all(isinstance(v, str) and v for v in cols.values()):
            raise DataError(f"{at}: columns must map logical names to column names, e.g. {{text: body}}")
        mr = spec.get("max_rows", 0)
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 0:
            raise DataError(f"{at}: max_rows must be 0 (all) or a positive integer, got {mr!r}")
        for key in ("source", "path", "split"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise DataError(f"{at}: {key} must be a string, got {spec[key]!r}")
        out.append(spec)
    return out


def resolve_parts(d) -> list:
    """The parts of data config `d`: one per data.datasets entry, else the single source (+ eval split)."""
    from .sources import resolve_sources

    specs = list(getattr(d, "datasets", None) or [])
    if not specs:
        train, ev = resolve_sources(d)
        return [Part("data", train, ev, d.template, dict(d.columns), 1.0, d.max_rows)]
    check_specs(specs)
    if d.eval_split:
        raise DataError("data.eval_split: not available with data.datasets (each source holds out "
                        "data.eval_fraction of its rows); leave it empty")
    parts = []
    for k, spec in enumerate(specs):
        at = f"data.datasets[{k}]"
        train, _ = resolve_source(spec.get("source") or "", spec.get("path") or "", spec.get("split") or d.train_split,
                                  getattr(d, "streaming", False), f"{at}.")
        parts.append(Part(at, train, None, spec.get("template") or d.template,
                          dict(spec["columns"]) if "columns" in spec else dict(d.columns),
                          float(spec.get("weight", 1.0)), int(spec.get("max_rows", d.max_rows))))
    return parts


def select_by_weight(pools: list, weights: list, seed: int, mode: str = "down") -> tuple[list, list]:
    """pools: per source, the example lengths (tokens) in source order -> (per source the kept indices; per
    source the token budget). Source k's budget is p_k * N with p_k = w_k / sum(w). mode down: N is the largest
    total no source must exceed, min_k T_k / p_k; up: the smallest total that drops no row, max_k T_k / p_k.
    A source whose budget is below its tokens keeps a seeded random subset of whole examples whose token count is
    as close to the budget as the greedy walk gets; above them (up), it is repeated whole floor(budget / T_k)
    times and the rest of its budget is such a subset. Indices are sorted within each repetition."""
    if mode not in ("down", "up"):
        raise ValueError(f"data.mixture: down or up, got {mode!r}")
    total_w = float(sum(weights))
    shares = [w / total_w for w in weights]
    totals = [sum(p) for p in pools]
    live = [k for k in range(len(pools)) if totals[k] > 0]
    if not live:
        return [[] for _ in pools], [0 for _ in pools]
    ratios = [totals[k] / shares[k] for k in live]  # a source with nothing (no eval rows) contributes nothing
    n = min(ratios) if mode == "down" else max(ratios)
    kept, budgets = [], []
    for k, lengths in enumerate(pools):
        budget = shares[k] * n
        budgets.append(budget)
        if totals[k] == 0:  # nothing to take (no eval rows of this source)
            kept.append([])
            continue
        reps = math.floor(budget / totals[k] + 1e-9)  # times used whole
        if mode == "down":
            reps = min(reps, 1)
        keep = list(range(len(lengths))) * reps
        rest = budget - totals[k] * reps
        if rest > 1e-9:
            g = torch.Generator().manual_seed(int(seed) * 1000 + k)
            order = torch.randperm(len(lengths), generator=g).tolist()
            have, take = 0, []
            for i in order:
                if have + lengths[i] / 2 <= rest:  # take it when that lands nearer the budget than leaving it
                    take.append(i)
                    have += lengths[i]
            keep += sorted(take)
        kept.append(keep)
    return kept, budgets
