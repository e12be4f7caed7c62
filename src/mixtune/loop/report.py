"""Run artefacts for people: the loss-curve PNG and the markdown run report.

    plot_losses(records, "runs/tiny/loss.png")      # records = metrics.jsonl rows
    write_report("runs/tiny/report.md", summary)
"""

from __future__ import annotations

import json
import os
from typing import Any

from .._fs import atomic_write, write_text_atomic


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file (missing file -> []; a line that is not a JSON object, e.g. cut off by a
    kill or a full disk, is skipped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def plot_losses(records: list[dict], path: str, title: str = "mixtune") -> str:
    """Train loss (per logged step) and eval loss (per evaluation) against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # replaces a symlink, never follows it
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(path: str, summary: dict[str, Any]) -> str:
    """A short markdown report: model, data, adapter, timings, loss before/after, before/after generations.

    summary keys used: title, command, model, device, dtype, quant, expert_precision, lora (dict), data (dict of
    stats), train (dict), eval_before,
    eval_after, generations ([{prompt, reference, before, after}]), files ([names])."""
    lines = [f"# {summary.get('title', 'mixtune run')}", ""]
    if summary.get("command"):
        lines += ["```", summary["command"], "```", ""]
    lines += ["## Setup", "", "| | |", "|---|---|"]
    for key in ("model", "device", "dtype", "quant", "expert_precision"):
        if key in summary:
            lines.append(f"| {key} | {_fmt(summary[key])} |")
    for key, v in (summary.get("lora") or {}).items():
        lines.append(f"| lora {key} | {_fmt(v)} |")
    for key, v in (summary.get("data") or {}).items():
        lines.append(f"| data {key} | {_fmt(v)} |")
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    for key, v in (summary.get("train") or {}).items():
        lines.append(f"| {key} | {_fmt(v)} |")
    eb, ea = summary.get("eval_before"), summary.get("eval_after")
    if eb or ea:
        lines += ["", "## Evaluation", "", "| | loss | perplexity |", "|---|---|---|"]
        if eb:
            lines.append(f"| before training | {eb['eval_loss']:.4f} | {eb['eval_perplexity']:.2f} |")
        if ea:
            lines.append(f"| after training | {ea['eval_loss']:.4f} | {ea['eval_perplexity']:.2f} |")
    if summary.get("loss_png"):
        lines += ["", f"![loss curves]({summary['loss_png']})"]
    gens = summary.get("generations") or []
    if gens:
        lines += ["", "## Generations (held-out examples)", ""]
        scores = summary.get("generation_scores") or {}
        if scores.get("before") and scores.get("after"):
            lines += ["| against the reference | exact match | chrF | BLEU | ROUGE-L |", "|---|---|---|---|---|"]
            for when in ("before", "after"):
                sc = scores[when]
                lines.append(f"| {when} training | {sc['exact_match']:.2f} | {sc.get('chrf', 0.0):.1f} | "
                             f"{sc.get('bleu', 0.0):.1f} | {sc.get('rouge_l', 0.0):.3f} |")
            lines += ["", "chrF and BLEU: sacrebleu (corpus level, 0-100); ROUGE-L: rouge-score (F-measure, 0-1)."]
            lines.append("")
        for i, g in enumerate(gens, 1):
            lines += [f"### Example {i}", "", "Prompt:", "", "```", g["prompt"].strip()[-800:], "```", "",
                      "| reference | before | after |", "|---|---|---|",
                      f"| {_cell(g.get('reference', ''))} | {_cell(g.get('before', ''))} | {_cell(g.get('after', ''))} |",
                      ""]
    if summary.get("files"):
        lines += ["", "## Files", ""] + [f"- `{f}`" for f in summary["files"]]
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")  # replaces a symlink, never writes through it
    return path


def _cell(text: str, limit: int = 300) -> str:
    t = " ".join(str(text).split())
    if len(t) > limit:
        t = t[:limit] + "…"
    return t.replace("|", "\\|") or "(empty)"


def side_by_side(gens: list[dict], width: int = 100, max_lines: int = 6) -> str:
    """Plain-text before | after columns per held-out example (with its reference), for the terminal."""
    import textwrap

    col = (width - 3) // 2
    out = []
    for i, g in enumerate(gens, 1):
        out.append(f"--- held-out example {i} " + "-" * max(0, width - 24))
        out.append("reference: " + _cell(g.get("reference", ""), width - 11))
        left = textwrap.wrap(" ".join(str(g.get("before", "")).split()), col)[:max_lines] or ["(empty)"]
        right = textwrap.wrap(" ".join(str(g.get("after", "")).split()), col)[:max_lines] or ["(empty)"]
        out.append(f"{'before training':<{col}} | after training")
        for k in range(max(len(left), len(right))):
            a = left[k] if k < len(left) else ""
            b = right[k] if k < len(right) else ""
            out.append(f"{a:<{col}} | {b}")
    return "\n".join(out)
