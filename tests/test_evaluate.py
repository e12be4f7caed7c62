"""Evaluation: token-weighted loss independent of batching; perplexity = exp(loss); generation helper."""

import math

import torch

from mixtune.config import load_config
from mixtune.loop.evaluation import evaluate_loss, generate_texts


def _model(tiny_ckpt):
    from mixtune.model import load_model
    return load_model(tiny_ckpt, quant="none", dtype=torch.float32, device="cpu", report=None)


def _rows(n=5, T=16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 32000, (T,), generator=g)
        labels = ids.clone()
        labels[: 2 + 3 * i] = -100  # different label counts per row
        rows.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(T)})
    return rows


def test_eval_loss_is_token_weighted_and_batch_independent(tiny_ckpt):
    model = _model(tiny_ckpt)
    rows = _rows()
    m1 = evaluate_loss(model, rows, batch_size=1)
    m3 = evaluate_loss(model, rows, batch_size=3)
    with torch.no_grad():
        s, n = 0.0, 0
        for r in rows:
            out = model(r["input_ids"][None], r["position_ids"][None], r["labels"][None], return_logits=False)
            s, n = s + float(out.loss_sum), n + int(out.n_tokens)
    assert m1["eval_tokens"] == m3["eval_tokens"] == n
    assert math.isclose(m1["eval_loss"], s / n, rel_tol=1e-5) and math.isclose(m3["eval_loss"], s / n, rel_tol=1e-5)
    assert math.isclose(m1["eval_perplexity"], math.exp(m1["eval_loss"]), rel_tol=1e-9)
    assert math.isnan(evaluate_loss(model, [], batch_size=2)["eval_loss"])


def test_eval_restores_training_mode(tiny_ckpt):
    model = _model(tiny_ckpt)
    model.train()
    evaluate_loss(model, _rows(2), batch_size=2)
    assert model.training


def test_generate_texts_uses_the_exact_prompt_ids(tiny_ckpt):
    from mixtune.data import load_tokenizer
    model = _model(tiny_ckpt)
    tok = load_tokenizer("", tiny_ckpt)
    gen = load_config(None, ["--generate.greedy", "true", "--generate.max_new_tokens", "5"]).generate
    text = "[INST]hello[/INST]"
    a = generate_texts(model, tok, [text], gen)[0]
    b = generate_texts(model, tok, [{"prompt": text, "prompt_ids": tok.encode(text, bos=True)}], gen)[0]
    assert a["token_ids"] == b["token_ids"] and 0 < len(a["token_ids"]) <= 5
    assert a["text"] == tok.decode(a["token_ids"]) and a["prompt"] == text


def test_generation_metrics_are_the_libraries_values():
    """chrF and BLEU are sacrebleu's corpus scores, ROUGE-L rouge-score's mean F-measure; exact match stays."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from mixtune.loop.evaluation import generation_metrics

    preds = ["Explain the moon.", "The cats are sitting on the mat today", "x"]
    refs = ["explain the moon", "The cat is sitting on the mat", "y z"]
    m = generation_metrics(preds, refs)
    assert set(m) == {"exact_match", "chrf", "bleu", "rouge_l"}
    assert abs(m["exact_match"] - 1 / 3) < 1e-12
    assert m["chrf"] == sacrebleu.corpus_chrf(preds, [refs]).score
    assert m["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert abs(m["rouge_l"] - sum(sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3) < 1e-12
    assert 0 < m["chrf"] < 100 and 0 < m["bleu"] < 100 and 0 < m["rouge_l"] < 1
    same = generation_metrics(refs, refs)
    assert same["exact_match"] == 1.0 and abs(same["chrf"] - 100) < 1e-9 and abs(same["rouge_l"] - 1) < 1e-12
    assert generation_metrics([], []) == {}
