"""Data formats through `mixtune prepare --dump-tokens`: raw text (continued pretraining), ShareGPT, OpenAI
messages with tool roles, mixtures mixed by weight, streamed datasets; and their bad input (one line, exit 2,
nothing written)."""

import json
import os

import pytest

from mixtune.config import load_config
from mixtune.data import IGNORE, load_tokenizer, prepare_data

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def _prepare(capsys, monkeypatch, tmp_path, *argv):
    """`mixtune prepare ... --dump-tokens` in process -> (exit code, stderr, dumped records or None)."""
    from mixtune.cli import main

    monkeypatch.setenv("MIXTUNE_CACHE", str(tmp_path / "mc"))
    dump = tmp_path / "tokens.jsonl"
    if dump.exists():
        dump.unlink()
    capsys.readouterr()
    rc = main(["prepare", "--train.eval_steps", "0", "--data.eval_fraction", "0", "--dump-tokens", str(dump),
               *argv])
    err = capsys.readouterr().err.strip()
    recs = [json.loads(line) for line in dump.read_text().splitlines()] if dump.exists() else None
    return rc, err, recs


def _cfg(tmp_path, *over):
    return load_config(overrides=["--data.cache_dir", str(tmp_path / "cache"), "--train.eval_steps", "0", *over])


def _nothing_written(tmp_path):
    assert not (tmp_path / "tokens.jsonl").exists()
    cache = tmp_path / "mc"
    assert not cache.exists() or not [f for _, _, fs in os.walk(cache) for f in fs]


# --------------------------------------------------------------------------------------------------
# raw text
# --------------------------------------------------------------------------------------------------

DOCS = ["The quick brown fox jumps over the lazy dog.", "Second document\nwith two lines and   spaces.",
        "def f(x):\n    return x * 2\n"]


def test_raw_text_ids_and_labels(tmp_path, capsys, monkeypatch, tok):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": d, "meta": i} for i, d in enumerate(DOCS)])
    rc, err, recs = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path, "--data.template", "text")
    assert rc == 0, err
    for doc, rec in zip(DOCS, recs):
        ids = [BOS] + tok.encode(doc) + [EOS]  # bos + the document + eos
        assert rec == {"input_ids": ids, "labels": [IGNORE] + ids[1:]}  # every token but the first is a label
    # any column, named by data.columns
    path2 = _jsonl(tmp_path / "body.jsonl", [{"body": d} for d in DOCS])
    rc, err, recs2 = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path2, "--data.template", "text",
                              "--data.columns", "{text: body}")
    assert rc == 0 and recs2 == recs


def test_raw_text_packs_documents_with_eos_between_and_restarting_positions(tmp_path, tok):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "text", "--data.eval_fraction", "0",
                          "--data.max_seq_length", "128"), tok)
    assert d.stats["train_rows"] == 1 and d.stats["train_examples"] == 3
    row = d.train_rows[0]
    ids, pos, labels = row["input_ids"].tolist(), row["position_ids"].tolist(), row["labels"].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    docs = [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)])]
    expect = sorted(([BOS] + tok.encode(x) + [EOS] for x in DOCS), key=len, reverse=True)  # best-fit decreasing
    assert docs[:3] == expect  # then the padding, its own document
    assert all(ids[s - 1] == EOS for s in starts[1:4])  # eos ends every document
    assert sum(lab != IGNORE for lab in labels) == sum(len(x) - 1 for x in expect)
    assert "whole text" in __import__("mixtune.data", fromlist=["format_stats"]).format_stats(d.stats)


def test_a_document_longer_than_a_row_is_split_not_cut(tmp_path, tok):
    long_doc = " ".join(f"word{i}" for i in range(60))
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": long_doc}, {"text": DOCS[0]}])
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "text", "--data.eval_fraction", "0",
                          "--data.max_seq_length", "32"), tok)
    full = [BOS] + tok.encode(long_doc) + [EOS]
    assert d.stats["split_documents"] == 1 and d.stats["truncated"] == 0
    assert d.stats["tokens"] == len(full) + len(tok.encode(DOCS[0])) + 2  # every token kept
    n_pieces = -(-len(full) // 32)  # each piece is a document: its first token is not a label
    assert sum(int((r["labels"] != IGNORE).sum()) for r in d.train_rows) == \
        (len(full) - n_pieces) + len(tok.encode(DOCS[0])) + 1
    got = [r["input_ids"][r["labels"] != IGNORE].tolist() for r in d.train_rows]
    assert sorted(sum(got, [])) == sorted([i for k, i in enumerate(full) if k % 32] + tok.encode(DOCS[0]) + [EOS])


# --------------------------------------------------------------------------------------------------
# ShareGPT and OpenAI messages with tools
# --------------------------------------------------------------------------------------------------


def test_sharegpt_mixtral_chat_ids_and_labels(tmp_path, capsys, monkeypatch, tok):
    rows = [{"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]}]
    path = _jsonl(tmp_path / "sharegpt.jsonl", rows)
    rc, err, recs = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path, "--data.template", "mixtral-chat")
    assert rc == 0, err
    p1, a1 = tok.encode("[INST] Be brief.\n\nHi there [/INST]"), tok.encode("Hello!") + [EOS]
    p2, a2 = tok.encode("[INST] Bye [/INST]"), tok.encode("Goodbye.") + [EOS]
    assert recs == [{"input_ids": [BOS] + p1 + a1 + p2 + a2,
                     "labels": [IGNORE] * (1 + len(p1)) + a1 + [IGNORE] * len(p2) + a2}]
    # the same conversation as OpenAI messages gives the same ids and labels
    msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in rows[0]["conversations"]]
    path2 = _jsonl(tmp_path / "openai.jsonl", [{"messages": msgs}])
    rc, err, recs2 = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path2, "--data.template", "mixtral-chat")
    assert rc == 0 and recs2 == recs


def _runs(rec):
    runs, cur = [], []
    for i, lab in zip(rec["input_ids"], rec["labels"]):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_sharegpt_and_openai_tool_turns_through_the_chat_template(tmp_path, capsys, monkeypatch, chatml_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 degrees."}]
    path = _jsonl(tmp_path / "tools.jsonl", [{"messages": msgs, "tools": json.dumps(tools)}])
    rc, err, recs = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path, "--data.template", "chat-template",
                             "--model.tokenizer", chatml_dir)
    assert rc == 0, err
    ref = [dict(m, content=m["content"] or "") for m in msgs]
    ids = list(hf.apply_chat_template(ref, tools=tools, tokenize=True)["input_ids"])
    assert recs[0]["input_ids"] == ids
    enc = lambda s: hf.encode(s, add_special_tokens=False)  # noqa: E731
    assert _runs(recs[0]) == [enc('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                  '</tool_call><|im_end|>'),
                              enc("<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>")]
    # ShareGPT with a tool turn, in a column named by data.columns: human/gpt/tool -> user/assistant/tool
    conv = [{"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "Let me check."},
            {"from": "tool", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]
    path2 = _jsonl(tmp_path / "sg.jsonl", [{"dialog": conv}])
    rc, err, recs2 = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path2, "--data.template",
                              "chat-template", "--model.tokenizer", chatml_dir, "--data.columns",
                              "{conversations: dialog}")
    assert rc == 0, err
    mapped = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
              for t in conv]
    assert recs2[0]["input_ids"] == list(hf.apply_chat_template(mapped, tokenize=True)["input_ids"])
    assert _runs(recs2[0]) == [enc("Let me check.<|im_end|>"), enc("<think>\n\n</think>\n\nSunny.<|im_end|>")]
    # a template without tool syntax refuses tool turns, naming the row
    rc, err, _ = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path2, "--data.template", "mixtral-chat",
                          "--data.columns", "{conversations: dialog}")
    assert rc == 2 and "sg.jsonl: row 1: tool turns" in err and "chat-template" in err


# --------------------------------------------------------------------------------------------------
# mixtures
# --------------------------------------------------------------------------------------------------


def _mixture_files(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = _jsonl(tmp_path / "text.jsonl", [{"text": " ".join(words[(i + k) % 12] for k in range(8 + i % 9))}
                                              for i in range(150)])
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Count to {i % 13}.", "output":
                                                 ", ".join(str(k) for k in range(i % 13 + 1))} for i in range(300)])
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "human", "value": f"Name the number {i}."}, {"from": "gpt", "value": f"It is {i}{'!' * (i % 5)}"}]}
        for i in range(300)])
    return text, alpaca, sharegpt


def test_mixture_token_shares_follow_the_weights(tmp_path, tok, capsys):
    text, alpaca, sharegpt = _mixture_files(tmp_path)
    spec = (f"[{{path: {text}, template: text, weight: 2}}, {{path: {alpaca}, template: alpaca, weight: 1}}, "
            f"{{path: {sharegpt}, template: mixtral-chat, weight: 1}}]")
    cfg = _cfg(tmp_path, "--data.datasets", spec, "--data.max_seq_length", "128")
    d = prepare_data(cfg, tok)
    src = d.stats["sources"]
    assert [s["template"] for s in src] == ["text", "alpaca", "mixtral-chat"]
    assert [s["schema"] for s in src] == ["text", "alpaca", "sharegpt"]
    total = sum(s["tokens"] for s in src)
    for s, w in zip(src, (0.5, 0.25, 0.25)):
        assert abs(s["tokens"] / total - w) <= 0.01 * w, (s, w)  # within 1% of each weight's share
    assert src[0]["rows_read"] == 150 and src[0]["train_examples"] == round(150 * 0.95)  # the scarcest: whole
    assert d.stats["tokens"] == total  # the packed stream carries exactly the selected tokens
    assert sum(int((r["position_ids"] == 0).sum()) for r in d.train_rows) >= d.stats["train_examples"]
    assert 0 < d.stats["eval_examples"] and d.stats["eval_from"] == "held out"
    # deterministic: the same rows again (no cache), and a cache hit gives them too
    d2 = prepare_data(cfg, tok, use_cache=False)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(d.train_rows, d2.train_rows))
    assert prepare_data(cfg, tok).stats["cached"] is True
    # another weight is another cache entry and other shares
    cfg3 = _cfg(tmp_path, "--data.datasets", spec.replace("weight: 2", "weight: 1"), "--data.max_seq_length", "128")
    d3 = prepare_data(cfg3, tok)
    assert d3.stats["cached"] is False
    total3 = sum(s["tokens"] for s in d3.stats["sources"])
    assert all(abs(s["tokens"] / total3 - 1 / 3) <= 0.01 / 3 for s in d3.stats["sources"])
    from mixtune.data import format_stats

    report = format_stats(d.stats)
    assert "weight 2 (50.0%)" in report and "text.jsonl (text -> text)" in report


def test_mixture_up_repeats_instead_of_dropping(tmp_path, tok):
    """data.mixture up: the same token shares (within 1%), every training example of every source used at least
    once (sources short for their weight repeated), evaluation never repeated."""
    text, alpaca, sharegpt = _mixture_files(tmp_path)
    spec = (f"[{{path: {text}, template: text, weight: 2}}, {{path: {alpaca}, template: alpaca, weight: 1}}, "
            f"{{path: {sharegpt}, template: mixtral-chat, weight: 1}}]")
    down = prepare_data(_cfg(tmp_path, "--data.datasets", spec, "--data.max_seq_length", "128"), tok).stats
    up = prepare_data(_cfg(tmp_path, "--data.datasets", spec, "--data.max_seq_length", "128",
                           "--data.mixture", "up"), tok).stats
    assert up["cached"] is False  # another cache entry than down's
    total = sum(s["tokens"] for s in up["sources"])
    for s, w in zip(up["sources"], (0.5, 0.25, 0.25)):
        assert abs(s["tokens"] / total - w) <= 0.01 * w, (s, w)
    rows = (150, 300, 300)
    for s, d, n in zip(up["sources"], down["sources"], rows):
        assert s["train_examples"] >= round(n * 0.95) and s["train_examples"] >= d["train_examples"]
    assert up["sources"][0]["train_examples"] > 2 * round(150 * 0.95)  # text: short for weight 2, repeated
    assert up["eval_examples"] == down["eval_examples"]


def test_select_by_weight_up_and_down():
    from mixtune.data.mixture import select_by_weight
    pools = [[10] * 10, [10] * 40]  # 100 and 400 tokens
    kept, budgets = select_by_weight(pools, [1, 1], seed=0)  # down: 100 + 100
    assert kept[0] == list(range(10)) and len(kept[1]) == 10 and budgets == [100, 100]
    kept, budgets = select_by_weight(pools, [1, 1], seed=0, mode="up")  # up: 400 + 400
    assert kept[1] == list(range(40)) and budgets == [400, 400]
    assert sorted(kept[0]) == sorted(list(range(10)) * 4)  # repeated whole 4 times, nothing dropped
    kept, _ = select_by_weight(pools, [1, 3], seed=0, mode="up")  # 400 is 3/4: 133.3 tokens for the first
    assert kept[0][:10] == list(range(10)) and len(kept[0]) == 13  # whole once + a 3-example top-up
    with pytest.raises(ValueError, match="down or up"):
        select_by_weight(pools, [1, 1], 0, mode="sideways")


def test_mixture_through_prepare_reports_rows_and_tokens_per_source(tmp_path, capsys, monkeypatch, tok):
    text, alpaca, _ = _mixture_files(tmp_path)
    from mixtune.cli import main

    monkeypatch.setenv("MIXTUNE_CACHE", str(tmp_path / "mc"))
    capsys.readouterr()
    spec = f"[{{path: {text}, template: text, weight: 1}}, {{path: {alpaca}, weight: 1, max_rows: 40}}]"
    rc = main(["prepare", "--json", "--data.datasets", spec, "--data.template", "alpaca", "--data.eval_fraction",
               "0", "--train.eval_steps", "0"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    stats = json.loads(out)
    a, b = stats["sources"]
    assert (a["rows_read"], b["rows_read"]) == (150, 40) and b["train_examples"] == 40  # alpaca is scarcest
    assert abs(a["tokens"] - b["tokens"]) <= 0.02 * b["tokens"]
    assert stats["tokens"] == a["tokens"] + b["tokens"]


# --------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------


def test_streaming_reads_a_dataset_row_by_row_with_the_same_result(tmp_path, tok):
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    _jsonl(ds_dir / "train.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(20)])
    base = ("--data.source", str(ds_dir), "--data.template", "alpaca", "--data.max_rows", "6",
            "--data.eval_fraction", "0")
    whole = prepare_data(_cfg(tmp_path, *base), tok)
    streamed = prepare_data(_cfg(tmp_path, *base, "--data.streaming", "true"), tok)
    assert streamed.stats["cached"] is False  # data.streaming is part of the cache key
    assert [(t.input_ids, t.labels) for _, t in streamed.examples] == \
        [(t.input_ids, t.labels) for _, t in whole.examples]
    assert streamed.stats["train_examples"] == 6 and streamed.stats["source"].endswith("my_dataset[train]")
    # the stream is consumed lazily: reading stops at max_rows
    import datasets

    from mixtune.data.mixture import resolve_parts
    from mixtune.data.records import read_examples

    cfg = _cfg(tmp_path, *base, "--data.streaming", "true")
    part = resolve_parts(cfg.data)[0]
    assert isinstance(part.train.dataset, datasets.IterableDataset)
    pulled = []
    inner = part.train.dataset

    class Counting:
        column_names = inner.column_names

        def __iter__(self):
            for row in inner:
                pulled.append(row)
                yield row

    part.train.dataset = Counting()
    exs, schema = read_examples(part.train, template="alpaca", columns={}, data_cfg=cfg.data, tokenizer=tok,
                                counts={}, bad_msgs=[], limit=3)
    assert len(exs) == 3 and len(pulled) == 3 and schema == "alpaca"


# --------------------------------------------------------------------------------------------------
# bad input: one line naming the file / row / key, exit 2, nothing written
# --------------------------------------------------------------------------------------------------


def test_sharegpt_turn_with_an_unknown_role(tmp_path, capsys, monkeypatch):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    path = _jsonl(tmp_path / "sg.jsonl", rows)
    rc, err, recs = _prepare(capsys, monkeypatch, tmp_path, "--data.path", path, "--data.template", "mixtral-chat")
    assert rc == 2 and len(err.splitlines()) == 1 and recs is None
    assert "sg.jsonl: row 2: column 'conversations': turn 2: unknown role (from) 'bot'" in err
    _nothing_written(tmp_path)


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "heavy"])
def test_mixture_weight_not_positive(tmp_path, capsys, monkeypatch, weight):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    spec = f"[{{path: {a}, weight: 1}}, {{path: {a}, weight: {weight}}}]"
    rc, err, recs = _prepare(capsys, monkeypatch, tmp_path, "--data.datasets", spec, "--data.template", "text")
    assert rc == 2 and len(err.splitlines()) == 1 and recs is None
    assert "data.datasets[1]: weight must be a number > 0" in err
    _nothing_written(tmp_path)


def test_a_dataset_without_a_column_for_its_format(tmp_path, capsys, monkeypatch):
    qa = _jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "response": "r"}])
    rc, err, _ = _prepare(capsys, monkeypatch, tmp_path, "--data.path", qa, "--data.template", "text")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "qa.jsonl: row 1: missing column 'text' for data.template text" in err and "prompt, response" in err
    _nothing_written(tmp_path)
    # in a mixture: the entry's file, row and column
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}])
    spec = f"[{{path: {docs}, template: text}}, {{path: {qa}, template: text, columns: {{text: body}}}}]"
    rc, err, _ = _prepare(capsys, monkeypatch, tmp_path, "--data.datasets", spec)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "qa.jsonl: row 1: missing column 'body' for data.template text" in err
    _nothing_written(tmp_path)
    # raw text given to a chat format
    rc, err, _ = _prepare(capsys, monkeypatch, tmp_path, "--data.path", docs, "--data.template", "mixtral-chat")
    assert rc == 2 and "docs.jsonl: row 1: only a 'text' column (raw text): use --data.template text" in err
    _nothing_written(tmp_path)


def test_mixture_entry_errors_name_the_entry(tmp_path, capsys, monkeypatch):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    for spec, msg in [(f"[{{path: {a}, wieght: 2}}]", "data.datasets[0]: unknown key 'wieght'"),
                      (f"[{{path: {a}, source: bundled}}]", "data.datasets[0]: give exactly one of source"),
                      (f"[{{path: {a}, template: chatml}}]", "data.datasets[0]: template 'chatml' is not one of"),
                      (f"[{{path: {tmp_path / 'nope.jsonl'}}}]", "data.datasets[0].path: file not found")]:
        rc, err, _ = _prepare(capsys, monkeypatch, tmp_path, "--data.datasets", spec, "--data.template", "text")
        assert rc == 2 and len(err.splitlines()) == 1 and msg in err, err
        _nothing_written(tmp_path)
