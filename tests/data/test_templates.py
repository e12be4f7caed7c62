"""Prompt formats: the recipe's text byte-exact, mixtral-chat ids == mistral-common's, loss masks, chat templates."""

import pytest

from mixtune.data import (BACKTRANSLATE_TASK, format_generation_prompt, load_tokenizer, recover_instruction,
                          wrap_instruction)
from mixtune.data.sources import DataError
from mixtune.data.templates import Conversation, render_example, to_conversation
from mixtune.data.tokenize import IGNORE, tokenize_example

WRAPPED = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction\nWrite a haiku about autumn leaves.\n\n### Response\n")
RESPONSE = "Crimson leaves drift down,\nwhispering to the cold earth -\nsummer's last goodbye."
CMAP = {k: k for k in ("prompt", "response", "source", "instruction", "input", "output", "messages")}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _conv(row, schema):
    return to_conversation(row, schema, CMAP, "rows.jsonl", 1)


def test_recipe_record_formats_byte_exact(tok):
    row = {"prompt": WRAPPED, "response": RESPONSE, "source": "dolly_hhrlhf"}
    assert recover_instruction(WRAPPED) == "Write a haiku about autumn leaves."
    assert wrap_instruction("Write a haiku about autumn leaves.") == WRAPPED
    ex = render_example("backtranslate", _conv(row, "instruct"), False)
    assert ex.text == ("<s>[INST]Use the provided input to create an instruction that could have been used to "
                       "generate the response with an LLM.\nCrimson leaves drift down,\nwhispering to the cold "
                       "earth -\nsummer's last goodbye.[/INST]Write a haiku about autumn leaves.</s>")
    t = tokenize_example(ex, tok)
    # <s> and </s> are ids 1 and 2 (never characters), bos exactly once; ids = the whole string encoded once
    body = ex.text[len("<s>"):-len("</s>")]
    assert t.input_ids == [1] + tok.encode(body) + [2]
    assert t.input_ids.count(1) == 1
    # default loss: the instruction + eos; bos and the prompt masked
    answer = [i for i, l in zip(t.input_ids, t.labels) if l != IGNORE]
    assert tok.decode(answer) == "Write a haiku about autumn leaves."
    assert answer[-1] == 2 and t.labels[-1] == 2
    n_ans = len(answer)
    assert all(l == IGNORE for l in t.labels[:-n_ans]) and t.labels[-n_ans:] == t.input_ids[-n_ans:]
    # generation prompt: what precedes the answer, without <s>; prompt_ids = bos + its ids = the training prefix
    assert ex.prompt == format_generation_prompt("backtranslate", RESPONSE)
    assert t.prompt_ids == t.input_ids[:len(t.input_ids) - n_ans]
    # train_on_prompt: every token but bos is a label
    t2 = tokenize_example(render_example("backtranslate", _conv(row, "instruct"), True), tok)
    assert t2.input_ids == t.input_ids and t2.labels == [IGNORE] + t.input_ids[1:]


def test_recover_instruction_is_the_recipes_replace_chain():
    assert recover_instruction("  plain instruction  ") == "plain instruction"
    odd = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction\nLine one\n\nLine two\n\n### Response\n")
    assert recover_instruction(odd) == "Line one\n\nLine two"


def _mistral_common_ids(turns):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    msgs = [cls[r](content=c) for r, c in turns]
    closing = "CLOSING TURN"  # mistral-common refuses to end on an assistant turn: add one user turn, then cut
    ids = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=msgs + [UserMessage(content=closing)])).tokens
    tail = MistralTokenizer.v1().instruct_tokenizer.tokenizer.encode(f"[INST] {closing} [/INST]", bos=False,
                                                                      eos=False)
    assert ids[-len(tail):] == tail
    return ids[:-len(tail)]


CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("user", "hello there"), ("assistant", "Hi! How are you?"), ("user", " second  q "), ("assistant", "ans2 "),
     ("user", "Write code:\n    x = 1"), ("assistant", "def f():\n    return 1")],
    [("system", "You are terse."), ("user", "Name a color."), ("assistant", "Blue."), ("user", "Another?"),
     ("assistant", "Green.")],
    # mistral-common drops an empty system prompt and keeps a whitespace-only one
    [("system", ""), ("user", "Name a color."), ("assistant", "Blue.")],
    [("system", " \n"), ("user", "Name a color."), ("assistant", "Blue.")],
    [("system", "A"), ("system", ""), ("system", "B"), ("user", "hi"), ("assistant", "yo")],
    # content is never stripped; unicode, CRLF, tabs, special-token strings as plain text; 3 turns
    [("user", "  lead and trail  "), ("assistant", "\n\nCafé ☕ 日本語 🤖\r\n"), ("user", "\ta\tb"),
     ("assistant", " say </s> and <s> [INST] "), ("user", "ﬁ ＡＢＣ"), ("assistant", "end  ")],
]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["single", "multi", "system", "empty-system",
                                                      "blank-system", "three-systems", "tricky-content"])
def test_mixtral_chat_ids_equal_mistral_common(tok, turns):
    conv = _conv({"messages": [{"role": r, "content": c} for r, c in turns]}, "chat")
    ex = render_example("mixtral-chat", conv, False)
    t = tokenize_example(ex, tok)
    assert t.input_ids == _mistral_common_ids(turns)
    # loss on every assistant turn and its eos, nothing else
    answers = [c for r, c in turns if r == "assistant"]
    expect = []
    for a in answers:
        expect += tok.encode(a) + [2]
    assert [i for i, l in zip(t.input_ids, t.labels) if l != IGNORE] == expect
    assert t.input_ids.count(1) == 1 and t.labels.count(2) == len(answers)
    # the generation prompt of the last answer is exactly the training prefix before it
    last = tok.encode(answers[-1]) + [2]
    assert t.prompt_ids == t.input_ids[:-len(last)]
    assert ex.reference == answers[-1]


def test_mixtral_chat_single_turn_from_instruct_row_and_generation_prompt(tok):
    conv = _conv({"prompt": WRAPPED, "response": RESPONSE}, "instruct")
    t = tokenize_example(render_example("mixtral-chat", conv, False), tok)
    assert t.input_ids == _mistral_common_ids([("user", "Write a haiku about autumn leaves."),
                                               ("assistant", RESPONSE)])
    p = format_generation_prompt("mixtral-chat", "Write a haiku about autumn leaves.")
    assert p == "[INST] Write a haiku about autumn leaves. [/INST]"
    assert tok.encode(p, bos=True) == t.prompt_ids


def test_alpaca_template_with_and_without_input(tok):
    ex = render_example("alpaca", _conv({"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
                                        "alpaca"), False)
    assert ex.text == ("<s>Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "Sort the numbers.\n\n### Input:\n3, 1, 2\n\n### Response:\n1, 2, 3</s>")
    ex2 = render_example("alpaca", _conv({"instruction": "Say hi.", "output": "Hi!"}, "alpaca"), False)
    assert ex2.text == ("<s>Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!</s>")
    t = tokenize_example(ex2, tok)
    assert tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE]) == "Hi!"
    assert format_generation_prompt("alpaca", "Say hi.") == ex2.prompt


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
                 "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_from_a_tokenizer_dir(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(tmp_path))
    ct = load_tokenizer(str(tmp_path))
    assert ct.chat_template
    turns = CONVERSATIONS[1]
    conv = _conv({"messages": [{"role": r, "content": c} for r, c in turns]}, "chat")
    ex = render_example("chat-template", conv, False, ct)
    t = tokenize_example(ex, ct)
    msgs = [{"role": r, "content": c} for r, c in turns]
    assert t.input_ids == hf.apply_chat_template(msgs, tokenize=True, return_dict=False) or \
        t.input_ids == hf.encode(hf.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
    assert t.input_ids.count(1) == 1
    trained = ct.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE], skip_special=False)
    # every assistant answer (and the template's eos after it) is trained, user text never is
    for r, c in turns:
        assert (c.strip() in trained) == (r == "assistant"), (r, c)
    assert trained.count("</s>") == 3 and "<|user|>" not in trained
    gp = format_generation_prompt("chat-template", "Hi", ct)
    assert gp == "<|user|>\nHi\n<|assistant|>\n"
    # the v1 tokenizer has no chat template: a clear error
    with pytest.raises(DataError, match="has none"):
        render_example("chat-template", conv, False, tok)


def test_unknown_template_is_a_clear_error():
    with pytest.raises(DataError, match="unknown template 'chatml'"):
        render_example("chatml", Conversation([("user", "a"), ("assistant", "b")], "a", "", "b"), False)
    with pytest.raises(DataError, match="unknown template"):
        format_generation_prompt("chatml", "x")


def _hf_backed_v1(tok, directory):
    """The v1 tokenizer through transformers (HF files without mixtune's SentencePiece marker), as a real
    checkpoint directory with tokenizer.json loads."""
    import json

    from mixtune.data.tokenizer import SP_MARKER

    tok.save_pretrained(str(directory))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop(SP_MARKER)
    cfg_path.write_text(json.dumps(cfg))
    hf = load_tokenizer(str(directory))
    assert hf.hf is not None and hf._sp is None
    return hf


def test_special_token_strings_in_content_stay_text_with_a_transformers_tokenizer(tok, tmp_path):
    # A response that talks about "</s>" must not get an eos id in the middle of the example (nor a bos for
    # "<s>"): the transformers backend must give the SentencePiece / mistral-common ids.
    hf = _hf_backed_v1(tok, tmp_path)
    row = {"prompt": wrap_instruction("Explain the end-of-sequence marker."),
           "response": "Mixtral ends every answer with </s>; prompts start with <s>. <unk> is id 0."}
    for template in ("backtranslate", "alpaca", "mixtral-chat"):
        schema_row = row if template != "alpaca" else {"instruction": row["response"], "output": "ok"}
        conv = _conv(schema_row, "instruct" if template != "alpaca" else "alpaca")
        a = tokenize_example(render_example(template, conv, False), tok)
        b = tokenize_example(render_example(template, conv, False), hf)
        assert b.input_ids == a.input_ids and b.labels == a.labels and b.prompt_ids == a.prompt_ids, template
        assert b.input_ids.count(1) == 1 and b.input_ids.count(2) == 1 and b.input_ids.count(0) == 0
    conv = _conv({"messages": [{"role": "user", "content": "say </s>"}, {"role": "assistant", "content": "<s>"}]},
                 "chat")
    assert tokenize_example(render_example("mixtral-chat", conv, False), hf).input_ids == \
        _mistral_common_ids([("user", "say </s>"), ("assistant", "<s>")])


def test_a_tokenizer_without_bos_gives_examples_without_a_bos_id():
    class NoBos:  # like Hub tokenizers whose bos_token is null: ids must stay ints (no None in the ids)
        bos_id, eos_id = None, 2

        def encode_content(self, text):
            return [3 + (ord(c) % 50) for c in text]

    conv = _conv({"prompt": WRAPPED, "response": RESPONSE}, "instruct")
    for template in ("backtranslate", "mixtral-chat", "alpaca"):
        t = tokenize_example(render_example(template, conv, False), NoBos())
        assert None not in t.input_ids and None not in t.prompt_ids
        assert t.input_ids[-1] == 2 and t.labels[-1] == 2 and t.labels[0] == IGNORE


@pytest.mark.parametrize("turns", CONVERSATIONS[:3], ids=["single", "multi", "system"])
def test_mixtral_chat_text_retokenizes_to_its_ids(tok, turns):
    # The dumped text (`mixtune prepare --dump-text`) read back by the HF tokenizer (specials parsed, as the
    # recipe tokenizes "<s>...</s>") gives the training ids: "</s>[INST]", no space, like "<s>[INST]".
    conv = _conv({"messages": [{"role": r, "content": c} for r, c in turns]}, "chat")
    ex = render_example("mixtral-chat", conv, False)
    t = tokenize_example(ex, tok)
    assert tok.hf.encode(ex.text, add_special_tokens=False) == t.input_ids
    assert [1] + tok.encode_with_specials(ex.prompt) == t.prompt_ids
    if len([r for r, _ in turns if r == "assistant"]) > 1:
        assert "</s>[INST] " in ex.text and "</s> [INST]" not in ex.text


SYS = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
       "request.")


@pytest.mark.parametrize("prompt,expected", [
    # the recipe's chain, applied to every row whatever its source: no special-casing of unwrapped rows
    (SYS + "\n\n### Instruction\n  padded  \n\n### Response\n", "padded"),
    ("What is 2 + 2?", "What is 2 + 2?"),                              # not wrapped (e.g. competition_math)
    ("Human: hi\n\nAssistant: hello\n\nHuman: bye", "Human: hi\n\nAssistant: hello\n\nHuman: bye"),
    (SYS + "\n\n### Instruction:\nColon variant\n\n### Response:\n",     # not the chain's markers: left in
     "### Instruction:\nColon variant\n\n### Response:"),
    (SYS + "\r\n\r\n### Instruction\r\nCRLF\r\n\r\n### Response\r\n",   # CRLF: only the sentence goes
     "### Instruction\r\nCRLF\r\n\r\n### Response"),
    ("\n\n### Instruction\nNo system sentence\n\n### Response\n", "No system sentence"),
    (SYS + "\n\n### Instruction\nQuote: \"" + SYS + "\"\n\n### Response\n", "Quote: \"\""),  # every occurrence
])
def test_recover_instruction_on_instruct_v3_variants(prompt, expected):
    assert recover_instruction(prompt) == expected
    text = render_example("backtranslate", _conv({"prompt": prompt, "response": " r "}, "instruct"), False).text
    assert text == "<s>[INST]" + BACKTRANSLATE_TASK + "\n r [/INST]" + expected + "</s>"  # response unstripped
