"""prepare_data / prepare_main: sources, bad input messages, skip counts, cache, dumps, held-out split."""

import json
import re

import pytest

from mixtune.config import ConfigError, load_config
from mixtune.data import IGNORE, format_stats, load_tokenizer, prepare_data, prepare_main, wrap_instruction
from mixtune.data.sources import DataError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _cfg(tmp_path, *over):
    return load_config(overrides=["--data.cache_dir", str(tmp_path / "cache"), "--train.eval_steps", "0", *over])


def _row(i, instruction=None, response=None):
    return {"prompt": wrap_instruction(instruction or f"Instruction number {i}: describe the number {i}."),
            "response": response or f"The number {i} is {'even' if i % 2 == 0 else 'odd'}.", "source": "t"}


def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return str(path)


@pytest.mark.parametrize("source,template", [("bundled", "backtranslate"), ("bundled", "mixtral-chat"),
                                             ("bundled-alpaca", "alpaca"), ("bundled-chat", "mixtral-chat")])
def test_bundled_sources_prepare_to_sensible_lengths(tmp_path, tok, source, template):
    d = prepare_data(_cfg(tmp_path, "--data.source", source, "--data.template", template,
                          "--data.max_seq_length", "512"), tok)
    s = d.stats
    if source == "bundled":
        assert s["rows_read"] >= 300 and s["schema"] == "instruct"
        assert 50 <= s["length"]["p50"] <= 400 and s["length"]["max"] <= 512
    assert s["rows_bad"] == 0 and s["truncated"] == 0 and s["eval_examples"] >= 1
    assert s["packing_efficiency"] > 0.8
    assert all(len(r["input_ids"]) == 512 for r in d.train_rows + d.eval_rows)
    assert s["tokens"] == sum(int((r["position_ids"] != 0).sum()) + int((r["position_ids"] == 0).sum())
                              - int((r["input_ids"] == 0).sum()) for r in d.train_rows)
    e = d.eval_examples[0]
    assert e["prompt"] and e["reference"] and e["prompt_ids"][0] == 1


def test_recipe_example_through_prepare_and_dumps(tmp_path, tok, capsys):
    rows = [_row(0, "Write a haiku about autumn leaves.", "Crimson leaves drift down.")] + [_row(i) for i in
                                                                                         range(1, 10)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = _cfg(tmp_path, "--data.path", path, "--data.template", "backtranslate")
    dt, dk = tmp_path / "out" / "text.jsonl", tmp_path / "out" / "tokens.jsonl"
    stats = prepare_main(cfg, json_out=True, dump_text=str(dt), dump_tokens=str(dk))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["rows_read"] == 10 == stats["rows_read"]
    texts = [json.loads(x)["text"] for x in dt.read_text().splitlines()]
    assert len(texts) == 10  # every example, in source order (held-out ones included)
    assert texts[0] == ("<s>[INST]Use the provided input to create an instruction that could have been used to "
                        "generate the response with an LLM.\nCrimson leaves drift down.[/INST]Write a haiku about "
                        "autumn leaves.</s>")
    toks = [json.loads(x) for x in dk.read_text().splitlines()]
    assert len(toks) == 10
    assert toks[0]["input_ids"] == [1] + tok.encode(texts[0][3:-4]) + [2]
    lab = toks[0]["labels"]
    assert lab[0] == IGNORE and lab[-1] == 2 and tok.decode([x for x in lab if x != IGNORE]) == \
        "Write a haiku about autumn leaves."


def test_cache_hit_on_second_run_and_invalidation(tmp_path, tok, capsys):
    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(30)])
    cfg = _cfg(tmp_path, "--data.path", path)
    a = prepare_data(cfg, tok)
    b = prepare_data(cfg, tok)
    assert a.stats["cached"] is False and b.stats["cached"] is True
    assert len(a.train_rows) == len(b.train_rows)
    for x, y in zip(a.train_rows + a.eval_rows, b.train_rows + b.eval_rows):
        assert all((x[k] == y[k]).all() for k in ("input_ids", "labels", "position_ids"))
    assert a.eval_examples == b.eval_examples
    stats = prepare_main(cfg)
    assert stats["cached"] is True and "[cached]" in capsys.readouterr().out
    # a changed file, template or length is a miss
    _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(31)])
    assert prepare_data(cfg, tok).stats["cached"] is False
    assert prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "mixtral-chat"),
                        tok).stats["cached"] is False
    assert prepare_data(_cfg(tmp_path, "--data.path", path, "--data.max_seq_length", "128"),
                        tok).stats["cached"] is False


def test_held_out_split_is_seeded_and_disjoint(tmp_path, tok):
    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(40)])
    a = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.eval_fraction", "0.25"), tok)
    b = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.eval_fraction", "0.25", "--data.seed", "1"), tok)
    assert a.stats["eval_examples"] == 10 and a.stats["train_examples"] == 30 and a.stats["eval_seed"] == 42
    assert [e["reference"] for e in a.eval_examples] != [e["reference"] for e in b.eval_examples]
    refs = {e["reference"] for e in a.eval_examples}
    trained = set()
    for r in a.train_rows:
        ids, lab = r["input_ids"].tolist(), r["labels"].tolist()
        trained.add(tok.decode([i for i, l in zip(ids, lab) if l not in (IGNORE, 2)]))
    assert not any(ref in t for ref in refs for t in trained)
    capped = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.eval_fraction", "0.25",
                               "--data.eval_max_rows", "3", "--data.max_rows", "20"), tok)
    assert capped.stats["eval_examples"] == 3 and capped.stats["rows_read"] == 20


def test_eval_split_file_and_other_formats(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(12)]
    jl = _write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"data": rows}))
    csvp = tmp_path / "a.csv"
    csvp.write_text("instruction,input,output\n" + "".join(f'"Add {i} and {i}.",,{2 * i}\n' for i in range(12)))
    pqp = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqp)
    results = []
    for p in (jl, js, csvp, pqp):
        d = prepare_data(_cfg(tmp_path, "--data.path", str(p), "--data.template", "alpaca",
                              "--data.eval_split", str(tmp_path / "a.jsonl")), tok)
        assert d.stats["schema"] == "alpaca" and d.stats["eval_from"].endswith("a.jsonl")
        assert d.stats["train_examples"] == 12 and d.stats["eval_examples"] == 12 and d.stats["rows_read"] == 24
        results.append([r["input_ids"].tolist() for r in d.train_rows])
    assert all(r == results[0] for r in results)
    capped = prepare_data(_cfg(tmp_path, "--data.path", jl, "--data.template", "alpaca", "--data.eval_split", jl,
                               "--data.eval_max_rows", "5"), tok)
    assert capped.stats["eval_examples"] == 5 and capped.stats["rows_read"] == 24  # 12 eval rows were read
    with pytest.raises(DataError, match="data.eval_split: 'test' is neither a file nor a split"):
        prepare_data(_cfg(tmp_path, "--data.path", jl, "--data.eval_split", "test"), tok)


def test_column_mapping(tmp_path, tok):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(6)]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "mixtral-chat",
                          "--data.columns", "{instruction: q, output: a}"), tok)
    assert d.stats["train_examples"] + d.stats["eval_examples"] == 6
    with pytest.raises(DataError, match="no known columns .have: a, q."):
        prepare_data(_cfg(tmp_path, "--data.path", path), tok)
    with pytest.raises(DataError, match="data.columns: unknown key 'question'"):
        prepare_data(_cfg(tmp_path, "--data.path", path, "--data.columns", "{question: q}"), tok)


BAD = [  # (raw line or row, reason, message pattern) — the good rows are lines 1-3, the bad one is line 4
    ({"prompt": wrap_instruction("x")}, "missing_column", r"rows.jsonl: row 4: missing column 'response'"),
    ({"prompt": wrap_instruction("x"), "response": None}, "null_value", r"row 4: column 'response' is null"),
    ({"prompt": wrap_instruction("x"), "response": "  "}, "empty_value", r"row 4: column 'response' is empty"),
    ({"prompt": wrap_instruction("x"), "response": 42}, "not_string",
     r"row 4: column 'response' is not a string \(got int '42'\)"),
    ({"prompt": wrap_instruction(" "), "response": "ok"}, "empty_value", r"row 4: column 'prompt' holds no instr"),
    ('{"prompt": "unterminated', "bad_line", r"rows.jsonl: row 4: not valid JSON"),
    ("[1, 2]", "not_object", r"row 4: expected a JSON object, got list"),
    # valid JSON, but a lone surrogate (a cut emoji) that no tokenizer accepts: was a sentencepiece traceback
    ('{"prompt": "Say it.", "response": "cut emoji \\ud83d here"}', "bad_text",
     r"row 4: column 'response' holds an invalid character \(lone surrogate '\\ud83d' at position 10\)"),
]


@pytest.mark.parametrize("bad,reason,pattern", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_messages_and_skip_counts(tmp_path, tok, bad, reason, pattern):
    raw = [bad] if isinstance(bad, str) else [json.dumps(bad)]
    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(3)], raw + [json.dumps(_row(9))])
    with pytest.raises(ConfigError, match=pattern) as ei:
        prepare_data(_cfg(tmp_path, "--data.path", path), tok)
    assert "\n" not in str(ei.value) and "skip_bad_rows" in str(ei.value)
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.skip_bad_rows", "true"), tok)
    assert d.stats["rows_bad"] == 1 and d.stats["rows_bad_by_reason"] == {reason: 1}
    assert d.stats["train_examples"] + d.stats["eval_examples"] == 4
    assert d.stats["bad_row_examples"] and "row 4" in d.stats["bad_row_examples"][0]


def test_undecodable_bytes_and_chat_rows(tmp_path, tok):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(json.dumps(_row(1)).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"row 2: line is not valid UTF-8"):
        prepare_data(_cfg(tmp_path, "--data.path", str(p)), tok)
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": "not a list"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", msgs)
    with pytest.raises(DataError, match=r"chat.jsonl: row 2: column 'messages': message 1 has role 'assistant', "
                                        r"expected 'user'"):
        prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "mixtral-chat"), tok)
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.template", "mixtral-chat",
                          "--data.skip_bad_rows", "true", "--data.eval_fraction", "0"), tok)
    assert d.stats["rows_bad_by_reason"] == {"bad_messages": 3, "null_value": 1}
    assert d.stats["train_examples"] == 1


def test_missing_file_unknown_template_and_no_rows(tmp_path, tok):
    with pytest.raises(DataError, match=r"data.path: file not found: .*nope.jsonl"):
        prepare_data(_cfg(tmp_path, "--data.path", str(tmp_path / "nope.jsonl")), tok)
    with pytest.raises(DataError, match=r"data.max_rows: must be 0 \(no cap\) or positive, got -3"):
        prepare_data(_cfg(tmp_path, "--data.max_rows", "-3"), tok)
    # a missing file given as data.source is "file not found" at once, not a Hub lookup (network retries)
    with pytest.raises(DataError, match=r"data.source: file not found: nope.csv$"):
        prepare_data(_cfg(tmp_path, "--data.source", "nope.csv"), tok)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        prepare_data(_cfg(tmp_path, "--data.path", str(tmp_path / "x.txt")), tok)
    with pytest.raises(ConfigError, match="data.template: 'chatml' is not one of"):
        _cfg(tmp_path, "--data.template", "chatml")
    cfg = _cfg(tmp_path)
    cfg.data.template = "chatml"  # set behind the config's back: prepare_data still refuses it clearly
    with pytest.raises(DataError, match="data.template: unknown template 'chatml'"):
        prepare_data(cfg, tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        prepare_data(_cfg(tmp_path, "--data.path", str(tmp_path / "empty.jsonl")), tok)


def test_overlong_truncate_or_drop(tmp_path, tok):
    long_resp = " ".join(f"word{i}" for i in range(200))
    rows = [_row(i) for i in range(6)] + [_row(6, response=long_resp)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["--data.path", path, "--data.max_seq_length", "96", "--data.eval_fraction", "0",
              "--data.train_on_prompt", "true"]  # (answer-only: see the no-answer-token test below)
    t = prepare_data(_cfg(tmp_path, *common), tok)
    assert t.stats["truncated"] == 1 and t.stats["dropped_overlong"] == 0 and t.stats["train_examples"] == 7
    d = prepare_data(_cfg(tmp_path, *common, "--data.overlong", "drop"), tok)
    assert d.stats["dropped_overlong"] == 1 and d.stats["train_examples"] == 6
    assert d.stats["tokens"] == t.stats["tokens"] - 96


def test_unpacked_rows(tmp_path, tok):
    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(8)])
    d = prepare_data(_cfg(tmp_path, "--data.path", path, "--data.packing", "false", "--data.eval_fraction", "0"),
                     tok)
    assert len(d.train_rows) == 8 and d.stats["packing_efficiency"] is None
    assert all(r["position_ids"].tolist() == list(range(len(r["input_ids"]))) for r in d.train_rows)


def test_hub_code_path_with_a_local_dataset_dir(tmp_path, tok):
    pytest.importorskip("datasets")
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    _write_jsonl(ds_dir / "train.jsonl", [_row(i) for i in range(8)])
    _write_jsonl(ds_dir / "test.jsonl", [_row(i) for i in range(100, 104)])
    d = prepare_data(_cfg(tmp_path, "--data.source", str(ds_dir), "--data.eval_split", "test"), tok)
    assert d.stats["source"].endswith("my_dataset[train]") and d.stats["eval_from"].endswith("my_dataset[test]")
    assert d.stats["train_examples"] == 8 and d.stats["eval_examples"] == 4
    with pytest.raises(DataError, match="cannot load Hub dataset"):
        prepare_data(_cfg(tmp_path, "--data.source", str(ds_dir), "--data.train_split", "nosuch"), tok)


def _cli(capsys, monkeypatch, tmp_path, *argv):
    """`mixtune prepare ...` in process: (exit code, stderr)."""
    from mixtune.cli import main

    monkeypatch.setenv("MIXTUNE_CACHE", str(tmp_path / "mc"))
    capsys.readouterr()
    rc = main(["prepare", *argv])
    return rc, capsys.readouterr().err.strip()


def test_cli_names_a_mapped_column_the_file_lacks(tmp_path, capsys, monkeypatch):
    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(3)])
    rc, err = _cli(capsys, monkeypatch, tmp_path, "--data.path", path, "--data.columns", "{prompt: q}")
    assert rc == 2 and len(err.splitlines()) == 1
    assert re.search(r"rows.jsonl: row 1: missing column 'q' \(data.columns maps prompt to it; the rows have: "
                     r"prompt, response, source\)", err), err


def test_cli_file_whose_every_row_is_bad_reports_the_row_error(tmp_path, capsys, monkeypatch):
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,response\nhello,world,extra\nagain,x,y\n")
    rc, err = _cli(capsys, monkeypatch, tmp_path, "--data.path", str(csv))
    assert rc == 2 and len(err.splitlines()) == 1
    assert "rows.csv: row 1: has 3 fields, the header has 2" in err and "no known columns" not in err
    rc, err = _cli(capsys, monkeypatch, tmp_path, "--data.path", str(csv), "--data.skip_bad_rows", "true")
    assert rc == 2 and "all 2 rows are bad {'bad_line': 2}" in err
    p = tmp_path / "rows.jsonl"
    p.write_text("not json\n")
    rc, err = _cli(capsys, monkeypatch, tmp_path, "--data.path", str(p))
    assert rc == 2 and "rows.jsonl: row 1: not valid JSON" in err


def test_files_with_a_utf8_byte_order_mark(tmp_path, tok):
    # Windows editors write a BOM; it is not part of row 1 (the CSV reader already skipped it).
    rows = [_row(i) for i in range(4)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "plain.jsonl").write_bytes(body)
    ids = []
    for name in ("bom.jsonl", "bom.json", "plain.jsonl"):
        d = prepare_data(_cfg(tmp_path, "--data.path", str(tmp_path / name), "--data.eval_fraction", "0"), tok)
        assert d.stats["rows_bad"] == 0 and d.stats["train_examples"] == 4
        ids.append([r["input_ids"].tolist() for r in d.train_rows])
    assert ids[0] == ids[1] == ids[2]


def test_truncation_that_leaves_no_answer_token_drops_and_counts_the_example(tmp_path, tok, capsys):
    # backtranslate puts the answer (the instruction) last: a long response truncated to max_seq_length keeps
    # only prompt tokens, i.e. a whole row of compute with zero loss. Such examples are dropped and counted.
    long_resp = " ".join(f"word{i}" for i in range(200))
    rows = [_row(i) for i in range(6)] + [_row(6, response=long_resp)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["--data.path", path, "--data.max_seq_length", "96", "--data.eval_fraction", "0"]
    d = prepare_data(_cfg(tmp_path, *common), tok)
    assert d.stats["dropped_no_labels"] == 1 and d.stats["truncated"] == 0 and d.stats["train_examples"] == 6
    assert all((r["labels"] != IGNORE).any() for r in d.train_rows)
    assert "1 dropped (truncation left no answer token)" in format_stats(d.stats)
    # with the loss on the whole text the truncated example still has labels: kept, counted as truncated
    w = prepare_data(_cfg(tmp_path, *common, "--data.train_on_prompt", "true"), tok)
    assert w.stats["dropped_no_labels"] == 0 and w.stats["truncated"] == 1 and w.stats["train_examples"] == 7


def test_eval_max_rows_samples_the_eval_split_instead_of_taking_its_head(tmp_path, tok):
    # an eval split sorted by source: the capped eval set must not be the first source only
    ev = [_row(i, f"Math question {i}?", f"Math answer {i}.") for i in range(20)] + \
         [_row(i, f"Code question {i}?", f"Code answer {i}.") for i in range(20)]
    ev_path = _write_jsonl(tmp_path / "test.jsonl", ev)
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(i) for i in range(10)])
    cfg = _cfg(tmp_path, "--data.path", path, "--data.eval_split", ev_path, "--data.eval_max_rows", "10")
    d = prepare_data(cfg, tok, use_cache=False)
    refs = [e["reference"] for e in d.eval_examples]
    assert len(refs) == 10 and any(r.startswith("Math") for r in refs) and any(r.startswith("Code") for r in refs)
    assert refs == [e["reference"] for e in prepare_data(cfg, tok, use_cache=False).eval_examples]  # seeded
    instructions = [f"Math question {i}?" for i in range(20)] + [f"Code question {i}?" for i in range(20)]
    idx = [instructions.index(r) for r in refs]
    assert idx == sorted(idx)  # kept in source order


def test_csv_with_a_field_over_the_csv_module_default_limit(tmp_path, tok):
    # Python's csv module refuses fields over 128 KiB by default (a traceback); long responses are real data
    big = "word " * 30000  # 150 KB
    p = tmp_path / "rows.csv"
    p.write_text("instruction,output\n" + f'"Say it.","{big}"\n' + '"Say hi.","Hi"\n')
    d = prepare_data(_cfg(tmp_path, "--data.path", str(p), "--data.template", "alpaca", "--data.eval_fraction",
                          "0", "--data.train_on_prompt", "true"), tok)
    assert d.stats["rows_read"] == 2 and d.stats["rows_bad"] == 0 and d.stats["truncated"] == 1


def test_dump_to_a_directory_is_refused_before_preparing(tmp_path, capsys, monkeypatch):
    rc, err = _cli(capsys, monkeypatch, tmp_path, "--dump-tokens", str(tmp_path))
    assert rc == 2 and err == f"mixtune: error: --dump-tokens: {tmp_path} is a directory; give a file name " \
                              f"(e.g. {tmp_path}/out.jsonl)"
    assert not (tmp_path / "mc").exists()  # nothing was prepared


def test_cache_misses_on_train_on_prompt_and_tokenizer_and_hits_on_a_touched_file(tmp_path, tok):
    import os

    path = _write_jsonl(tmp_path / "rows.jsonl", [_row(i) for i in range(12)])
    cfg = _cfg(tmp_path, "--data.path", path)
    assert prepare_data(cfg, tok).stats["cached"] is False
    os.utime(path, (1, 1))  # same content, new mtime: still a hit
    assert prepare_data(cfg, tok).stats["cached"] is True
    assert prepare_data(_cfg(tmp_path, "--data.path", path, "--data.train_on_prompt", "true"),
                        tok).stats["cached"] is False
    import shutil

    from mixtune.data import v1_model_path
    from mixtune.data.tokenizer import SP_MARKER

    other = tmp_path / "other.model"
    shutil.copyfile(v1_model_path(), other)
    assert load_tokenizer(str(other)).identity() == tok.identity()  # same model file: same identity, a hit
    assert prepare_data(cfg, load_tokenizer(str(other))).stats["cached"] is True
    hf_dir = tmp_path / "hf_tok"  # the same vocabulary through transformers: another tokenizer, a miss
    tok.save_pretrained(str(hf_dir))
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tc.pop(SP_MARKER)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    assert prepare_data(cfg, load_tokenizer(str(hf_dir))).stats["cached"] is False
