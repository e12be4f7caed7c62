"""The recipe preset formats every bundled row as the tutorial's `create_prompt` does, byte for byte, and keeps
none of TRL 0.7's packing defects: one bos and one eos per example, whole examples per row, nothing dropped,
positions restarting per example."""

import json
import os
from collections import Counter

import pytest

from mixtune.config import load_config
from mixtune.data import load_tokenizer, prepare_data
from mixtune.data.packing import IGNORE
from mixtune.data.sources import bundled_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "mixtral-8x7b-recipe.yaml")


def create_prompt(sample: dict) -> str:
    """The tutorial's formatting function, re-stated from its description: the instruction is recovered from
    instruct-v3's Alpaca-wrapped `prompt` by removing the system sentence, "\\n\\n### Instruction\\n" and
    "\\n### Response\\n", then stripping; the text is "<s>" + "[INST]" + task + "\\n" + response + "[/INST]" +
    instruction + "</s>"."""
    system = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.")
    task = ("Use the provided input to create an instruction that could have been used to generate the response "
            "with an LLM.")
    instruction = (sample["prompt"].replace(system, "").replace("\n\n### Instruction\n", "")
                   .replace("\n### Response\n", "").strip())
    return "<s>" + "[INST]" + task + "\n" + sample["response"] + "[/INST]" + instruction + "</s>"


def _rows() -> list:
    with open(bundled_path("bundled"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(params=["embedded-tiny", "tiny-checkpoint"])
def prepared(request, tmp_path):
    """The recipe preset, model and data pointed at the tiny model and the bundled instruct-v3 sample."""
    model = request.getfixturevalue("tiny_ckpt") if request.param == "tiny-checkpoint" else ""
    cfg = load_config(RECIPE, ["--model.name_or_path", model, "--data.source", "bundled", "--data.eval_split", "",
                               "--data.cache_dir", str(tmp_path / "data")])
    assert cfg.data.template == "backtranslate" and cfg.data.train_on_prompt and cfg.data.packing
    assert cfg.data.max_seq_length == 1024
    tok = load_tokenizer(cfg.model.tokenizer, model_dir=cfg.model.name_or_path or None)
    return cfg, tok, prepare_data(cfg, tok, use_cache=False), model


def test_formatted_text_is_create_prompt_byte_for_byte_with_one_bos_one_eos(prepared):
    cfg, tok, prep, _ = prepared
    rows = _rows()
    assert prep.stats["rows_bad"] == 0 and len(prep.examples) == len(rows) > 100
    bos, eos = tok.bos_id, tok.eos_id
    assert (bos, eos) == (1, 2)
    for row, (text, t) in zip(rows, prep.examples):
        assert text == create_prompt(row)
        assert text.encode("utf-8") == create_prompt(row).encode("utf-8")
        ids = t.input_ids
        assert ids.count(bos) == 1 and ids[0] == bos
        assert ids.count(eos) == 1 and ids[-1] == eos
        # <s> and </s> are the ids, the text between them encoded once, without special tokens
        assert ids == [bos] + tok.encode_content(text[len("<s>"):-len("</s>")]) + [eos]
        # loss on the whole text, eos included; bos is never a label
        assert t.labels == [IGNORE] + ids[1:]


def test_trl07_tokenization_of_the_same_text_has_two_bos_and_two_eos(tiny_ckpt):
    """What the tutorial's stack feeds the model, re-stated: TRL 0.7's ConstantLengthDataset calls the Mixtral
    tokenizer with its defaults (bos added, "<s>"/"</s>" parsed as specials) and appends eos after each text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = create_prompt(_rows()[0])
    trl07 = hf([text], truncation=False)["input_ids"][0] + [hf.eos_token_id]
    assert trl07[:2] == [1, 1] and trl07[-2:] == [2, 2]
    assert trl07.count(1) == 2 and trl07.count(2) == 2


def test_packed_rows_hold_whole_examples_and_drop_nothing(prepared):
    cfg, tok, prep, _ = prepared
    assert prep.stats["truncated"] == 0 and prep.stats["dropped_overlong"] == 0
    segments = []
    for row in prep.train_rows + prep.eval_rows:
        ids, labels, pos = row["input_ids"].tolist(), row["labels"].tolist(), row["position_ids"].tolist()
        assert len(ids) == cfg.data.max_seq_length
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))  # positions restart at 0 per example: the document mask
            seg = ids[a:b]
            if all(l == IGNORE for l in labels[a:b]) and set(seg) == {tok.pad_id}:
                assert b == len(ids)  # padding only at the tail of a row
                continue
            assert seg[0] == tok.bos_id and seg[-1] == tok.eos_id
            assert seg.count(tok.bos_id) == 1 and seg.count(tok.eos_id) == 1
            segments.append(tuple(seg))
    # every example exactly once, whole: none cut across rows, none dropped (the last partial row included)
    assert Counter(segments) == Counter(tuple(t.input_ids) for _, t in prep.examples)
