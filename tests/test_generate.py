"""KV-cache generation: greedy ids equal stock transformers' generate; eos stops a row; sampling is seeded."""

import json

import pytest
import torch

from mixtune.model.sampling import generate, sample_next
from mixtune.model import load_model


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)


PROMPTS = [[1, 733, 16289, 28793, 16230, 1526], [1, 22557], [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28723, 28734]]


def test_greedy_equals_stock_generate(ours, tiny_ckpt, hf_model_from):
    stock = hf_model_from(tiny_ckpt)
    got = generate(ours, PROMPTS, max_new_tokens=12, greedy=True)  # batched, left-aligned
    for p, g in zip(PROMPTS, got):
        ref = stock.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert g == ref[0, len(p):].tolist()
        assert generate(ours, [p], max_new_tokens=12, greedy=True)[0] == g  # alone == batched


def test_stops_at_eos_per_row(ours):
    free = generate(ours, PROMPTS, max_new_tokens=10, greedy=True, eos_id=-1)  # no eos: full length
    assert [len(r) for r in free] == [10, 10, 10]
    eos = free[0][3]  # pretend row 0's 4th token is eos
    got = generate(ours, PROMPTS, max_new_tokens=10, greedy=True, eos_id=eos)
    assert got[0] == free[0][:4]
    for g, f in zip(got, free):  # every row is its free run, cut after its first eos
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert g == f[:cut]
    assert generate(ours, PROMPTS[:1], max_new_tokens=0) == [[]]
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[]], max_new_tokens=3)


def test_sampling_is_seeded(ours):
    kw = dict(max_new_tokens=5, greedy=False, temperature=1.0, top_p=0.9, top_k=0)
    a = generate(ours, PROMPTS, seed=1, **kw)
    assert a == generate(ours, PROMPTS, seed=1, **kw)
    assert a != generate(ours, PROMPTS, seed=2, **kw)
    greedy = generate(ours, PROMPTS, max_new_tokens=5, greedy=True)
    assert generate(ours, PROMPTS, max_new_tokens=5, greedy=False, temperature=1.0, top_p=1.0, top_k=1) == greedy
    assert generate(ours, PROMPTS, max_new_tokens=5, greedy=False, temperature=1.0, top_p=1e-6, top_k=0) == greedy


def test_nf4_greedy_with_cache_equals_recomputing_everything(tiny_ckpt):
    model = load_model(tiny_ckpt, quant="nf4", dtype=torch.float32, report=None)
    got = generate(model, PROMPTS[:2], max_new_tokens=4, greedy=True, eos_id=-1)
    for p, g in zip(PROMPTS[:2], got):
        ids = list(p)
        with torch.no_grad():
            for _ in range(4):  # no cache: the whole sequence every step
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert g == ids[len(p):]


def test_sample_next_truncation():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(2000, 1)  # (2000, 5)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, greedy=False, temperature=1.0, top_p=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    p = logits[0].softmax(-1)  # token 1: .47, 2: .43 -> top_p .8 keeps both, .4 keeps only token 1
    assert set(sample_next(logits, greedy=False, temperature=1.0, top_p=0.8, top_k=0, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, greedy=False, temperature=1.0, top_p=0.4, top_k=0, generator=g).tolist()) == {1}
    full = sample_next(logits, greedy=False, temperature=1.0, top_p=1.0, top_k=0, generator=g)
    freq = torch.bincount(full, minlength=5).float() / 2000
    assert torch.allclose(freq, p, atol=0.04)
    assert sample_next(logits[:1], greedy=True, temperature=1.0, top_p=1.0, top_k=0, generator=None).item() == 1


def test_generate_main_json(tiny_ckpt, capsys):
    data = pytest.importorskip("mixtune.data")
    if not hasattr(data, "format_generation_prompt") or not hasattr(data, "load_tokenizer"):
        pytest.skip("mixtune.data has no format_generation_prompt/load_tokenizer yet")
    from mixtune.config import load_config
    from mixtune.generate import generate_main

    cfg = load_config(None, ["--model.name_or_path", tiny_ckpt, "--model.quant", "none", "--model.dtype", "float32",
                             "--generate.greedy", "true", "--generate.max_new_tokens", "5", "--model.device", "cpu"])
    res = generate_main(cfg, ["Write a haiku about the sea", "Hello"], adapter=None, json_out=True)
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert lines == res and len(res) == 2
    tok = data.load_tokenizer("", tiny_ckpt)
    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)
    for r, text in zip(res, ["Write a haiku about the sea", "Hello"]):
        assert r["prompt"] == text and 0 < len(r["token_ids"]) <= 5
        ids = [tok.bos_id] + tok.encode(data.format_generation_prompt(cfg.data.template, text))
        assert r["token_ids"] == generate(model, [ids], max_new_tokens=5, greedy=True, eos_id=tok.eos_id)[0]
        assert r["text"] == tok.decode(r["token_ids"])


def test_generate_main_chat_template_and_literal_specials(tiny_ckpt, tmp_path, capsys):
    """chat-template prompts go through the tokenizer's own template; in the other templates a literal '</s>'
    in the user's text stays text (as in training), never an eos id inside the prompt."""
    import shutil

    from transformers import AutoTokenizer

    from mixtune.config import load_config
    from mixtune.data import load_tokenizer
    from mixtune.generate import generate_main

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt, ckpt)
    hf = AutoTokenizer.from_pretrained(ckpt)
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    hf.save_pretrained(ckpt)
    tok = load_tokenizer("", ckpt)
    assert tok.chat_template
    base = ["--model.name_or_path", ckpt, "--model.quant", "none", "--model.dtype", "float32", "--model.device",
            "cpu", "--generate.greedy", "true", "--generate.max_new_tokens", "2"]
    res = generate_main(load_config(None, base + ["--data.template", "chat-template"]), ["Hi"], None, True)
    assert res[0]["formatted_prompt"] == "<|user|>\nHi\n<|assistant|>\n"
    text = "keep </s> as text"
    res = generate_main(load_config(None, base + ["--data.template", "mixtral-chat"]), [text], None, True)
    ids = [tok.bos_id] + tok.encode_content(f"[INST] {text} [/INST]")
    assert tok.eos_id not in ids[1:]
    assert res[0]["prompt_tokens"] == len(ids)
    capsys.readouterr()


def test_context_rule_caps_new_tokens_with_a_notice_and_refuses_a_full_prompt(ours):
    """prompt + new tokens never exceed max_position_embeddings: new tokens are capped (told through
    `notice`); a prompt that fills the context alone is refused."""
    import dataclasses

    orig = ours.config
    try:
        ours.config = dataclasses.replace(orig, max_position_embeddings=12)
        said = []
        got = generate(ours, PROMPTS, max_new_tokens=10000, greedy=True, eos_id=-1, notice=said.append)
        assert [len(p) + len(g) for p, g in zip(PROMPTS, got)] == [12, 12, 12]  # each row up to the limit
        assert len(said) == 1 and "exceed the model's context of 12 tokens" in said[0] and "at most 2" in said[0]
        ours.config = dataclasses.replace(ours.config, max_position_embeddings=10)
        with pytest.raises(ValueError, match="a prompt of 10 tokens leaves no room in the model's context of 10"):
            generate(ours, PROMPTS, max_new_tokens=1, greedy=True)
    finally:
        ours.config = orig
    free = generate(ours, PROMPTS, max_new_tokens=6, greedy=True, eos_id=-1)
    assert [len(g) for g in free] == [6, 6, 6]  # within the context: nothing capped


def test_tiny_temperature_is_greedy_and_nan_logits_are_one_line(ours):
    greedy = generate(ours, PROMPTS, max_new_tokens=4, greedy=True)
    for t in (1e-45, 1e-30, 1e-6):
        assert generate(ours, PROMPTS, max_new_tokens=4, greedy=False, temperature=t, top_p=0.95) == greedy
    logits = torch.tensor([[1e30, -1e30, 0.0]])
    assert sample_next(logits, greedy=False, temperature=1e-4, top_p=1.0, top_k=0,
                       generator=torch.Generator().manual_seed(0)).item() == 0  # no overflow to nan
    w = ours.lm_head.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite logits"):
            generate(ours, PROMPTS[:1], max_new_tokens=2, greedy=False, temperature=0.7)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_cli_max_new_tokens_beyond_the_context_is_capped_with_a_notice(tiny_ckpt, tmp_path, capsys):
    import shutil

    from mixtune import cli
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt, ckpt)
    with open(f"{ckpt}/config.json") as fh:
        hf = json.load(fh)
    hf["max_position_embeddings"] = 64
    with open(f"{ckpt}/config.json", "w") as fh:
        json.dump(hf, fh)
    rc = cli.main(["generate", "--model", ckpt, "--model.device", "cpu", "--model.quant", "none", "--prompt", "Hi",
                   "--max-new-tokens", "10000", "--generate.temperature", "1e-45", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["prompt_tokens"] + len(rec["token_ids"]) <= 64
    assert "mixtune: generate: prompt + max_new_tokens" in err and "Traceback" not in err


def _captured_ids(monkeypatch):
    """Record the prompt ids the model receives (mixtune.generate.generate stands in for the decoder)."""
    import mixtune.generate as gen

    seen = []

    def fake(model, prompts, **kw):
        seen.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake)
    return seen


def _chatml_tokenizer(directory):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent / "data" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_data_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_chatml_tokenizer(str(directory))


def test_cli_raw_sends_exactly_bos_and_the_prompt_ids(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--raw: no template; the model receives bos (the v1 tokenizer has one) + the prompt's own ids, and for a
    tokenizer without bos (ChatML, as Qwen3) exactly the prompt's ids -- no None, no template text."""
    from mixtune.cli import main
    from mixtune.data import load_tokenizer

    seen = _captured_ids(monkeypatch)
    text = "Once upon a time </s> there"
    base = ["generate", "--model", tiny_ckpt, "--quant", "none", "--model.device", "cpu", "--prompt", text]
    assert main(base + ["--raw", "--json"]) == 0
    tok = load_tokenizer("", tiny_ckpt)
    assert seen[-1] == [1] + tok.encode_content(text) and seen[-1][1:] == tok.encode(text)
    assert json.loads(capsys.readouterr().out)["formatted_prompt"] == text
    _chatml_tokenizer(tmp_path / "chatml")
    assert main(base + ["--raw", "--model.tokenizer", str(tmp_path / "chatml")]) == 0
    chatml = load_tokenizer(str(tmp_path / "chatml"))
    assert chatml.bos_id is None and seen[-1] == chatml.hf(text, add_special_tokens=False)["input_ids"]
    assert main(base + ["--raw", "--chat"]) == 2
    assert "--raw and --chat" in capsys.readouterr().err


def test_cli_chat_equals_apply_chat_template_with_generation_prompt(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--chat: the prompt as one user turn through the tokenizer's chat template, generation prompt added: the
    ids equal transformers' apply_chat_template(add_generation_prompt=True); the default stays the training
    template (mixtral-chat on the tiny default)."""
    from mixtune.cli import main

    seen = _captured_ids(monkeypatch)
    hf = _chatml_tokenizer(tmp_path / "chatml")
    base = ["generate", "--model", tiny_ckpt, "--quant", "none", "--model.device", "cpu",
            "--model.tokenizer", str(tmp_path / "chatml"), "--prompt", "What is the capital of France?"]
    assert main(base + ["--chat"]) == 0
    want = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert seen[-1] == list(want)
    assert main(base + ["--chat", "--data.chat_template_kwargs", '{"enable_thinking": false}']) == 0
    want = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False,
                                  enable_thinking=False)
    assert seen[-1] == list(want)
    assert main(base) == 0  # default: the training template (mixtral-chat), no bos for this tokenizer
    assert seen[-1] != list(want) and None not in seen[-1]
    capsys.readouterr()
