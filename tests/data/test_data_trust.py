"""Regression tests for the data findings of issue 11: a FIFO as data.path, duplicate JSON/JSONL keys and CSV header
names, a mixed-schema file blaming row 1, the eval message that blamed eval_fraction, a silent 1-row run."""

import json
import os
import signal

import pytest

from mixtune.config import load_config
from mixtune.data import load_tokenizer, prepare_data, wrap_instruction
from mixtune.data.sources import DataError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _cfg(tmp_path, *over):
    return load_config(overrides=["--data.cache_dir", str(tmp_path / "cache"), "--train.eval_steps", "0", *over])


def _cli(capsys, monkeypatch, tmp_path, verb, *argv):
    from mixtune.cli import main

    monkeypatch.setenv("MIXTUNE_CACHE", str(tmp_path / "mc"))
    capsys.readouterr()
    rc = main([verb, *argv])
    return rc, capsys.readouterr().err.strip()


ROW = {"prompt": wrap_instruction("Say hi."), "response": "Hi!"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_as_data_path_is_refused_without_hanging(tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("prepare blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        rc, err = _cli(capsys, monkeypatch, tmp_path, "prepare", "--data.path", str(fifo), "--train.eval_steps", "0")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"data.path: {fifo} is not a regular file (a pipe, device or socket)" in err


def test_duplicate_keys_in_jsonl_and_json_name_the_key_and_row(tmp_path, tok):
    p = tmp_path / "rows.jsonl"
    good = json.dumps(ROW)
    p.write_text(good + "\n" + good + "\n" + '{"prompt": "a", "response": "b", "response": "c"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: row 3: duplicate key 'response' in one JSON object"):
        prepare_data(_cfg(tmp_path, "--data.path", str(p)), tok)
    d = prepare_data(_cfg(tmp_path, "--data.path", str(p), "--data.skip_bad_rows", "true"), tok)
    assert d.stats["rows_bad_by_reason"] == {"duplicate_key": 1}
    # nested objects too (a chat message with two roles)
    q = tmp_path / "chat.jsonl"
    q.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "role": "user", '
                 '"content": "x"}]}\n')
    with pytest.raises(DataError, match=r"chat.jsonl: row 1: duplicate key 'role'"):
        prepare_data(_cfg(tmp_path, "--data.path", str(q), "--data.template", "mixtral-chat"), tok)
    # a .json list: the row is the list position
    r = tmp_path / "rows.json"
    r.write_text("[" + good + ", " + good + ', {"prompt": "a", "prompt": "b", "response": "c"}]')
    with pytest.raises(DataError, match=r"rows.json: row 3: duplicate key 'prompt'"):
        prepare_data(_cfg(tmp_path, "--data.path", str(r)), tok)


def test_duplicate_csv_header_names_the_column(tmp_path, capsys, monkeypatch):
    p = tmp_path / "rows.csv"
    p.write_text("prompt,response,prompt\nhello,world,again\n")
    rc, err = _cli(capsys, monkeypatch, tmp_path, "prepare", "--data.path", str(p), "--train.eval_steps", "0")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "rows.csv: header: duplicate column name 'prompt' (columns 1 and 3)" in err


def test_a_mixed_schema_file_names_the_offending_row(tmp_path, tok):
    p = tmp_path / "rows.jsonl"
    rows = [ROW, ROW, {"instruction": "Say hi.", "output": "Hi!"}, ROW]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"rows.jsonl: row 3: missing column 'prompt': the file's schema is instruct "
                                        r"\(set by row 1\) but this row has: instruction, output"):
        prepare_data(_cfg(tmp_path, "--data.path", str(p)), tok)


def test_one_row_dataset_says_why_there_is_no_eval(tmp_path, tok, capsys, monkeypatch):
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps(ROW) + "\n")
    capsys.readouterr()
    d = prepare_data(_cfg(tmp_path, "--data.path", str(p)), tok)  # eval_fraction 0.05 (the default)
    assert d.stats["train_examples"] == 1 and d.stats["eval_examples"] == 0
    reason = "has 1 usable row: data.eval_fraction 0.05 holds out none (one row must stay for training)"
    assert reason in d.stats["eval_note"]
    err = capsys.readouterr().err
    assert "mixtune: notice: no evaluation data:" in err and reason in err  # training goes on, and says so
    # `mixtune eval` names the real reason, not "set data.eval_fraction > 0" (it is 0.05)
    rc, err = _cli(capsys, monkeypatch, tmp_path, "eval", "--data.path", str(p), "--train.eval_steps", "0")
    assert rc != 0 and reason in err and "set data.eval_fraction > 0" not in err
    # no notice when evaluation was switched off on purpose
    capsys.readouterr()
    prepare_data(_cfg(tmp_path, "--data.path", str(p), "--data.eval_fraction", "0"), tok)
    assert "notice" not in capsys.readouterr().err
