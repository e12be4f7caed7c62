"""Chat templates for the MoE families: a checkpoint's own ChatML template (Qwen3 style, with and without thinking
blocks) token-exact with transformers' apply_chat_template, and Mixtral-8x22B's mistral-common v3 format."""

import pytest

from mixtune.data import format_generation_prompt, load_tokenizer
from mixtune.data.templates import render_example, to_conversation
from mixtune.data.tokenize import encode_generation_prompt
from mixtune.data.tokenize import IGNORE, tokenize_example

CMAP = {"messages": "messages"}


def _conv(msgs):
    return to_conversation({"messages": msgs}, "chat", CMAP, "rows.jsonl", 1)


def _ids(hf, msgs, **kw):
    out = hf.apply_chat_template(msgs, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _runs(t):
    """The contiguous runs of trained ids."""
    runs, cur = [], []
    for i, lab in zip(t.input_ids, t.labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.fixture(scope="module")
def chatml(chatml_dir):
    from transformers import AutoTokenizer

    return load_tokenizer(chatml_dir), AutoTokenizer.from_pretrained(chatml_dir)


SYSTEM_MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And the weather?\n  (briefly)"},
    {"role": "assistant", "content": "Sunny, 21 degrees."},
]
THINKING = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nadd the numbers\n</think>\n\n4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "<think>\nthree plus three\n</think>\n\nIt is 6."},
]


def test_chatml_loads_as_the_checkpoint_tokenizer(chatml):
    tok, hf = chatml
    assert tok.bos_id is None and tok.eos_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == hf.convert_tokens_to_ids("<|endoftext|>") != tok.eos_id  # never eos
    assert tok.chat_template and "<think>" in tok.chat_template


def test_multi_turn_with_system_equals_apply_chat_template(chatml):
    tok, hf = chatml
    ex = render_example("chat-template", _conv(SYSTEM_MULTI), False, tok)
    t = tokenize_example(ex, tok)
    assert t.input_ids == _ids(hf, SYSTEM_MULTI)
    assert ex.text == hf.apply_chat_template(SYSTEM_MULTI, tokenize=False)
    # loss: each answer and its <|im_end|>; the historical answer as rendered, the last one with the template's
    # (empty) think block; the "\n" after <|im_end|> and every prompt token masked
    assert _runs(t) == [hf.encode(s, add_special_tokens=False) for s in
                        ["Paris is the capital.<|im_end|>", "<think>\n\n</think>\n\nSunny, 21 degrees.<|im_end|>"]]
    nl = hf.encode("\n", add_special_tokens=False)
    ends = [k for k, lab in enumerate(t.labels) if lab == tok.eos_id]
    assert len(ends) == 2 and all(t.input_ids[k + 1:k + 2] == nl and t.labels[k + 1] == IGNORE for k in ends)
    # the eval generation prompt of the last answer is exactly the template's generation prompt
    assert t.prompt_ids == _ids(hf, SYSTEM_MULTI[:-1], add_generation_prompt=True)
    assert ex.reference == "Sunny, 21 degrees."
    # train_on_prompt: every token but the first is a label
    t2 = tokenize_example(render_example("chat-template", _conv(SYSTEM_MULTI), True, tok), tok)
    assert t2.input_ids == t.input_ids and t2.labels == [IGNORE] + t.input_ids[1:]


def test_thinking_blocks_equal_apply_chat_template(chatml):
    tok, hf = chatml
    ex = render_example("chat-template", _conv(THINKING), False, tok)
    t = tokenize_example(ex, tok)
    assert t.input_ids == _ids(hf, THINKING)
    # the template drops the reasoning of the answer before the last query (the labels follow the text), and
    # the last answer's reasoning is learned
    text = ex.text
    assert "add the numbers" not in text and "three plus three" in text
    assert _runs(t) == [hf.encode(s, add_special_tokens=False) for s in
                        ["4<|im_end|>", "<think>\nthree plus three\n</think>\n\nIt is 6.<|im_end|>"]]
    assert t.prompt_ids == _ids(hf, THINKING[:-1], add_generation_prompt=True)
    # reasoning given as reasoning_content renders (and trains) the same
    alt = [dict(m) for m in THINKING]
    alt[-1] = {"role": "assistant", "content": "It is 6.", "reasoning_content": "three plus three"}
    t3 = tokenize_example(render_example("chat-template", _conv(alt), False, tok), tok)
    assert t3.input_ids == t.input_ids == _ids(hf, alt) and t3.labels == t.labels


def test_enable_thinking_false_puts_the_empty_think_block_in_the_prompt(chatml):
    tok, hf = chatml
    kw = {"enable_thinking": False}
    ex = render_example("chat-template", _conv(SYSTEM_MULTI), False, tok, kw)
    t = tokenize_example(ex, tok)
    assert t.input_ids == _ids(hf, SYSTEM_MULTI, **kw)
    assert _runs(t)[-1] == hf.encode("Sunny, 21 degrees.<|im_end|>", add_special_tokens=False)
    assert t.prompt_ids == _ids(hf, SYSTEM_MULTI[:-1], add_generation_prompt=True, **kw)
    # an answer with reasoning under enable_thinking false: the same ids as transformers, loss from the point
    # where its text leaves the generation prompt
    t4 = tokenize_example(render_example("chat-template", _conv(THINKING), False, tok, kw), tok)
    assert t4.input_ids == _ids(hf, THINKING, **kw)
    assert tok.decode(_runs(t4)[-1], skip_special=False).endswith("three plus three\n</think>\n\nIt is 6.<|im_end|>")


def test_generation_prompt(chatml):
    tok, hf = chatml
    user = [{"role": "user", "content": "What is the capital of France?"}]
    assert format_generation_prompt("chat-template", user[0]["content"], tok) == \
        hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert encode_generation_prompt("chat-template", user[0]["content"], tok) == \
        _ids(hf, user, add_generation_prompt=True)
    kw = {"enable_thinking": False}
    assert format_generation_prompt("chat-template", user[0]["content"], tok, kw).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert encode_generation_prompt("chat-template", user[0]["content"], tok, kw) == \
        _ids(hf, user, add_generation_prompt=True, **kw)


def test_tool_calls_and_results_through_the_template(chatml):
    tok, hf = chatml
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 degrees in Paris."}]
    conv = to_conversation({"messages": msgs, "tools": tools}, "chat", CMAP, "rows.jsonl", 1)
    t = tokenize_example(render_example("chat-template", conv, False, tok), tok)
    assert t.input_ids == _ids(hf, msgs, tools=tools)
    runs = [tok.decode(r, skip_special=False) for r in _runs(t)]
    assert runs[0].startswith("<tool_call>\n{\"name\": \"get_weather\"") and runs[0].endswith("</tool_call><|im_end|>")
    assert runs[1].endswith("It is 21 degrees in Paris.<|im_end|>") and len(runs) == 2
    assert "temp" not in "".join(runs)  # the tool result is input, never a label


# --------------------------------------------------------------------------------------------------
# Mixtral-8x22B: mistral-common v3
# --------------------------------------------------------------------------------------------------


def _mc_v3(finetuning: bool):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if not finetuning:
        return MistralTokenizer.v3()
    from mixtune.data.tokenizer import V3_SPEC, mistral_common_model_path

    return MistralTokenizer.from_file(mistral_common_model_path(V3_SPEC), mode=ValidationMode.finetuning)


def _mc_ids(turns, finetuning=True):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    req = ChatCompletionRequest(messages=[cls[r](content=c) for r, c in turns])
    return _mc_v3(finetuning).encode_chat_completion(req).tokens


V3_CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("system", "You are terse."), ("user", "Name a color."), ("assistant", "Blue."), ("user", "Another?"),
     ("assistant", "Green.")],
    [("system", "A"), ("system", ""), ("system", "B"), ("user", "hi"), ("assistant", "yo"), ("user", "again"),
     ("assistant", "yo yo"), ("user", "third"), ("assistant", "done")],
    # content never stripped (answers lose trailing spaces, as mistral-common v3 does); unicode, CRLF, code,
    # control-token and special-token strings as plain text
    [("user", "  lead and trail  "), ("assistant", "\n\nCafé ☕ 日本語 🤖\r\n  "), ("user", "\ta [INST] b [/INST]"),
     ("assistant", " say </s> and <s> [INST] "), ("user", "Write code:\n    x = 1"),
     ("assistant", "def f():\n    return 1")],
]


@pytest.fixture(scope="module")
def v3():
    return load_tokenizer("mistral-common:v3")


def test_v3_tokenizer_is_mistral_commons(v3):
    mc = _mc_v3(False).instruct_tokenizer.tokenizer
    assert (v3.vocab_size, v3.bos_id, v3.eos_id, v3.unk_id) == (32768, 1, 2, 0)
    assert (v3.special_id("[INST]"), v3.special_id("[/INST]")) == (3, 4)
    for s in ("hello world", " two  spaces", "日本語\n\tx"):
        assert v3.encode(s) == mc.encode(s, bos=False, eos=False)


@pytest.mark.parametrize("turns", V3_CONVERSATIONS, ids=["single", "system-multi", "three-systems", "tricky"])
def test_mixtral_v3_chat_ids_equal_mistral_common(v3, turns):
    conv = _conv([{"role": r, "content": c} for r, c in turns])
    ex = render_example("mixtral-v3-chat", conv, False, v3)
    t = tokenize_example(ex, v3)
    assert t.input_ids == _mc_ids(turns)  # the whole conversation, as mistral-common tokenizes it for fine-tuning
    # the prompt of the last answer = MistralTokenizer.v3() serving the conversation up to its last user turn
    last = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
    assert t.prompt_ids == _mc_ids(turns[:last], finetuning=False)
    # loss: every answer (trailing spaces stripped) and its eos, nothing else
    expect = []
    for r, c in turns:
        if r == "assistant":
            expect += v3.encode(c.rstrip(" ")) + [2]
    assert [i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE] == expect
    assert t.input_ids.count(3) == t.input_ids.count(4) == sum(r == "user" for r, _ in turns)


def test_mixtral_v3_chat_generation_prompt_and_wrong_tokenizer(v3):
    ids = encode_generation_prompt("mixtral-v3-chat", "Name a color.", v3)
    assert ids == _mc_ids([("user", "Name a color.")], finetuning=False) == [1, 3] + v3.encode("Name a color.") + [4]
    assert format_generation_prompt("mixtral-v3-chat", "Name a color.") == "[INST] Name a color.[/INST]"
    from mixtune.data.sources import DataError

    conv = _conv([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(DataError, match=r"no \[INST\] control token.*mistral-common:v3"):
        tokenize_example(render_example("mixtral-v3-chat", conv, False), load_tokenizer())


def test_chat_template_through_prepare_and_its_cache_key(tmp_path, chatml_dir, chatml):
    import json

    from mixtune.config import load_config
    from mixtune.data import prepare_data

    tok, hf = chatml
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": SYSTEM_MULTI}, {"conversations": [{"from": "human", "value": "Hi"},
                                                           {"from": "gpt", "value": "Hello."}]}]
    path.write_text(json.dumps(rows[0]) + "\n")
    base = ["--data.cache_dir", str(tmp_path / "c"), "--train.eval_steps", "0", "--data.path", str(path),
            "--data.template", "chat-template", "--data.eval_fraction", "0", "--data.max_seq_length", "512"]
    a = prepare_data(load_config(overrides=base), tok)
    assert a.examples[0][1].input_ids == _ids(hf, SYSTEM_MULTI)
    b = prepare_data(load_config(overrides=base + ["--data.chat_template_kwargs", "{enable_thinking: false}"]), tok)
    assert b.stats["cached"] is False and b.stats["label_tokens"] < a.stats["label_tokens"]  # think block: prompt
    assert prepare_data(load_config(overrides=base), tok).stats["cached"] is True
    # a ShareGPT column whose turns use role/content keys reads too
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello."}]}) + "\n")
    c = prepare_data(load_config(overrides=base), tok)
    assert c.examples[0][1].input_ids == _ids(hf, [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello."}])
