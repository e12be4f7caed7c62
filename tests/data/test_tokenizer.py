"""Tokenizer: the v1 model from mistral-common, and HF files stock AutoTokenizer loads to the same ids."""

import json
import os
import random

import pytest

from mixtune.config import ConfigError
from mixtune.data import load_tokenizer

REF = "<s>[INST] hello [/INST] world</s>"
REF_IDS = [1, 733, 16289, 28793, 6312, 28709, 733, 28748, 16289, 28793, 1526, 2]  # STACK.md, = mistral-common


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_v1_tokenizer_facts(tok):
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
    assert tok.pad_id != tok.eos_id
    assert tok.encode("hello") == [6312, 28709]  # never adds specials unless asked
    assert tok.encode("hello", bos=True, eos=True) == [1, 6312, 28709, 2]
    assert [1] + tok.encode("[INST] hello [/INST] world") + [2] == REF_IDS
    assert tok.decode([1, 6312, 28709, 2]) == "hello"
    assert tok.decode([1, 6312, 28709, 2], skip_special=False) == "<s>hello</s>"
    assert load_tokenizer("mistral-common:v1").identity() == tok.identity()


def test_save_pretrained_round_trip_through_stock_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    files = tok.save_pretrained(str(tmp_path))
    assert "tokenizer_config.json" in files and "tokenizer.model" in files
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    assert cfg["legacy"] is True
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == 32000
    assert tok.hf.encode(REF, add_special_tokens=False) == REF_IDS  # the lazily built transformers view
    # the trap: without legacy: true, the "[" after <s> becomes 28792 instead of 733
    assert hf.encode(REF, add_special_tokens=False) == REF_IDS
    assert hf.encode("hello") == [1, 6312, 28709]  # bos added by default, like the Mixtral tokenizer
    texts = ["The capital of France is Paris.", "  two  spaces\nnew line\ttab", "naïve café ünïcödé 日本語 🙂",
             "def f(x):\n    return x ** 2  # square", "[INST]Use the input\nresponse[/INST]instruction",
             " leading space", "trailing  ", "1234567 3.14159", "a\u00a0b"]
    rng = random.Random(0)  # fuzz: whitespace runs, digits, punctuation, non-ASCII
    alphabet = list("abcdeXYZ019 .,;:!?'\"()[]{}#_-+*/\\\n\t") + ["  ", "    ", "é", "ß", "中", "🙂", "[INST]"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False) == tok.encode(t), t
    # our loader on the saved dir (HF backend) agrees too, and so does a bare tokenizer.model directory
    back = load_tokenizer(str(tmp_path))  # our own exact files: read back through SentencePiece
    assert back.identity() == tok.identity() and back.vocab_size == 32000 and back.pad_id == 0
    cfg.pop("mixtune_sentencepiece_exact")  # without the marker: the HF backend, same ids
    json.dump(cfg, open(tmp_path / "tokenizer_config.json", "w"))
    back = load_tokenizer(str(tmp_path))
    assert back._sp is None and back.hf is not None and back.vocab_size == 32000 and back.pad_id == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    os.link(tmp_path / "tokenizer.model", bare / "tokenizer.model")
    sp_dir = load_tokenizer("", model_dir=str(bare))
    for t in texts:
        assert back.encode(t) == tok.encode(t) == sp_dir.encode(t)
    # model_dir without tokenizer files falls back to v1
    assert load_tokenizer("", model_dir=str(tmp_path / "nothing-here")).identity() == tok.identity()


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer("./no/such/tokenizer")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="cannot read SentencePiece model"):
        load_tokenizer(str(bad))


def test_identity_of_a_transformers_tokenizer_covers_its_pipeline_not_just_the_vocabulary(tok, tmp_path):
    # Same vocabulary, different pre-tokenizer (transformers' own converter vs mixtune's exact files): the ids
    # differ, so the identity (the prepared-data cache key) must differ too, or a stale cache is reused.
    from mixtune.data.tokenizer import SP_MARKER

    dirs = []
    for name, stock in (("exact", False), ("stock", True)):
        d = tmp_path / name
        tok.save_pretrained(str(d))
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop(SP_MARKER)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        if stock:
            tj = json.loads((d / "tokenizer.json").read_text())
            tj["normalizer"] = None
            tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                   "split": False}
            (d / "tokenizer.json").write_text(json.dumps(tj))
        dirs.append(str(d))
    a, b = load_tokenizer(dirs[0]), load_tokenizer(dirs[1])
    assert a.encode("  indented") != b.encode("  indented")
    assert a.identity() != b.identity()
    assert load_tokenizer(dirs[0]).identity() == a.identity()  # and stays stable for the same files
