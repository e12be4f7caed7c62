"""Run artefacts: loss PNG, markdown report, side-by-side generations."""

from mixtune.loop.report import plot_losses, read_metrics, side_by_side, write_report


def test_plot_report_and_side_by_side(tmp_path):
    recs = [{"kind": "eval", "step": 0, "eval_loss": 10.0, "eval_perplexity": 22026.0},
            {"kind": "train", "step": 5, "loss": 9.0}, {"kind": "train", "step": 10, "loss": 7.0},
            {"kind": "eval", "step": 10, "eval_loss": 7.5, "eval_perplexity": 1808.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in recs))
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == recs and read_metrics(str(tmp_path / "no")) == []
    png = plot_losses(recs, str(tmp_path / "loss.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"
    gens = [{"prompt": "p", "reference": "ref | pipe", "before": "b " * 80, "after": "a"}]
    write_report(str(tmp_path / "report.md"), {
        "title": "t", "model": "m", "eval_before": recs[0], "eval_after": recs[-1], "loss_png": "loss.png",
        "generations": gens, "generation_scores": {
            "before": {"exact_match": 0.0, "chrf": 12.5, "bleu": 3.25, "rouge_l": 0.1},
            "after": {"exact_match": 1.0, "chrf": 100.0, "bleu": 100.0, "rouge_l": 1.0}}})
    text = (tmp_path / "report.md").read_text()
    assert "| before training | 10.0000 |" in text and "| after training | 7.5000 |" in text
    assert "ref \\| pipe" in text and "| after training | 1.00 | 100.0 | 100.0 | 1.000 |" in text
    assert "| before training | 0.00 | 12.5 | 3.2 | 0.100 |" in text
    sbs = side_by_side(gens, width=60).splitlines()
    assert sbs[2].startswith("before training") and all(" | " in line for line in sbs[2:])
