"""Rows -> conversations -> prompt formats (with the loss mask), byte- and token-exact.

Schemas (picked from the columns present, after `data.columns` mapping):
  instruct : `prompt` (instruct-v3's Alpaca-wrapped instruction), `response`  (+ `source`, unused)
  alpaca   : `instruction`, `output`, optional `input`
  chat     : `messages` = [{"role": "system"|"user"|"assistant", "content": str}, ...]

Templates (`data.template`):
  backtranslate  the reference recipe: bos + "[INST]Use the provided input ... LLM.\n" + response + "[/INST]"
                 + instruction + eos (the answer is the instruction), encoded as ONE SentencePiece string.
  mixtral-chat   mistral-common v1: bos, then per turn `[INST] {user} [/INST]` and the answer as separately
                 encoded segments, eos after every answer; a system message is prefixed to the first user turn.
  alpaca         the Stanford Alpaca prompt (with/without input), bos ... eos.
  chat-template  the tokenizer's own `chat_template` (rendered text, special-token strings parsed as specials).

An `Example` is a list of segments; each text segment is encoded as one string and its pieces carry the loss
flag (see tokenize.py). `<s>`/`</s>` are ids, never text; in `Example.text` they are rendered literally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .sources import BadRow, DataError

TEMPLATES = ("backtranslate", "mixtral-chat", "alpaca", "chat-template")

# instruct-v3's wrapper and the recipe's recovery of the instruction from it (SPEC.md §1).
INSTRUCT_V3_SYSTEM = ("Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.")
INSTRUCT_V3_WRAPPER = INSTRUCT_V3_SYSTEM + "\n\n### Instruction\n{instruction}\n\n### Response\n"
BACKTRANSLATE_TASK = ("Use the provided input to create an instruction that could have been used to generate "
                      "the response with an LLM.")

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

LOGICAL_COLUMNS = ("prompt", "response", "source", "instruction", "input", "output", "messages")


def recover_instruction(prompt: str) -> str:
    """The recipe's recovery: drop the system sentence, "\\n\\n### Instruction\\n", "\\n### Response\\n"; strip."""
    return (prompt.replace(INSTRUCT_V3_SYSTEM, "").replace("\n\n### Instruction\n", "")
            .replace("\n### Response\n", "").strip())


def wrap_instruction(instruction: str) -> str:
    """instruct-v3's `prompt` field for an instruction (used to write the bundled data)."""
    return INSTRUCT_V3_WRAPPER.format(instruction=instruction)


# --------------------------------------------------------------------------------------------------
# rows -> conversations
# --------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """A normalised row: turns [(role, content)], plus the instruction/input/response view of single turns."""
    turns: list  # [(role, content)], roles system/user/assistant, ends with an assistant turn
    instruction: str = ""
    input: str = ""
    response: str = ""
    source: Optional[str] = None


def column_map(mapping: dict) -> dict:
    bad = [k for k in mapping if k not in LOGICAL_COLUMNS]
    if bad:
        raise DataError(f"data.columns: unknown key {bad[0]!r}; keys are {', '.join(LOGICAL_COLUMNS)}")
    return {k: str(mapping.get(k, k)) for k in LOGICAL_COLUMNS}


def detect_schema(columns: set, cmap: dict, where: str, first_row: int = 1) -> str:
    if cmap["messages"] in columns:
        return "chat"
    if cmap["instruction"] in columns:
        return "alpaca"
    if cmap["prompt"] in columns:
        return "instruct"
    have = ", ".join(sorted(columns)) or "none"
    absent = [(k, v) for k, v in cmap.items() if v != k and v not in columns]
    if absent:  # the user's mapping names a column the data does not have: say which
        k, v = absent[0]
        raise DataError(f"{where}: row {first_row}: missing column {v!r} (data.columns maps {k} to it; the "
                        f"rows have: {have})")
    raise DataError(f"{where}: no known columns (have: {have}); expected prompt/response (instruct-v3), "
                    f"instruction/input/output (Alpaca) or messages (chat); map yours with "
                    f"--data.columns '{{prompt: my_col, response: my_col2}}'")


def _check_text(v: str, at: str) -> None:
    """JSON can carry a lone surrogate (\\ud83d from a cut emoji): valid JSON, but no tokenizer takes it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow("bad_text", f"{at} holds an invalid character (lone surrogate {v[e.start]!r} at "
                                 f"position {e.start})") from None


def _field(row: dict, col: str, where: str, number: int, optional: bool = False) -> str:
    if col not in row:
        if optional:
            return ""
        raise BadRow("missing_column", f"{where}: row {number}: missing column {col!r}")
    v = row[col]
    if v is None:
        if optional:
            return ""
        raise BadRow("null_value", f"{where}: row {number}: column {col!r} is null")
    if not isinstance(v, str):
        raise BadRow("not_string", f"{where}: row {number}: column {col!r} is not a string "
                                   f"(got {type(v).__name__} {str(v)[:40]!r})")
    if not v.strip() and not optional:
        raise BadRow("empty_value", f"{where}: row {number}: column {col!r} is empty")
    _check_text(v, f"{where}: row {number}: column {col!r}")
    return v


def _messages(row: dict, col: str, where: str, number: int) -> list:
    if col not in row:
        raise BadRow("missing_column", f"{where}: row {number}: missing column {col!r}")
    msgs = row[col]
    if msgs is None:
        raise BadRow("null_value", f"{where}: row {number}: column {col!r} is null")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise BadRow("bad_messages", f"{where}: row {number}: column {col!r} must be a non-empty list of "
                                     f"{{role, content}} objects")
    turns = []
    for i, m in enumerate(msgs, start=1):
        at = f"{where}: row {number}: column {col!r}: message {i}"
        if not isinstance(m, dict):
            raise BadRow("bad_messages", f"{at}: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise BadRow("bad_messages", f"{at}: role {role!r} is not system, user or assistant")
        if content is None:
            raise BadRow("null_value", f"{at}: content is null")
        if not isinstance(content, str):
            raise BadRow("not_string", f"{at}: content is not a string (got {type(content).__name__})")
        if not content.strip() and role != "system":  # an empty system prompt is no system prompt
            raise BadRow("empty_value", f"{at}: content is empty")
        _check_text(content, f"{at}: content")
        turns.append((role, content))
    # System messages only at the start; then user/assistant alternating, starting with user.
    k = 0
    while k < len(turns) and turns[k][0] == "system":
        k += 1
    expect = "user"
    for i in range(k, len(turns)):
        if turns[i][0] != expect:
            raise BadRow("bad_messages", f"{where}: row {number}: column {col!r}: message {i + 1} has role "
                                         f"{turns[i][0]!r}, expected {expect!r} (system first, then user/"
                                         f"assistant alternating)")
        expect = "assistant" if expect == "user" else "user"
    while turns and turns[-1][0] != "assistant":
        turns.pop()  # a trailing user turn has no answer to learn
    if not any(r == "assistant" for r, _ in turns):
        raise BadRow("bad_messages", f"{where}: row {number}: column {col!r}: no assistant turn to train on")
    return turns


def to_conversation(row: dict, schema: str, cmap: dict, where: str, number: int) -> Conversation:
    """Validate one row of `schema` and normalise it; raises BadRow naming file, row and column."""
    if schema == "instruct":
        prompt = _field(row, cmap["prompt"], where, number)
        response = _field(row, cmap["response"], where, number)
        instruction = recover_instruction(prompt)
        if not instruction:
            raise BadRow("empty_value", f"{where}: row {number}: column {cmap['prompt']!r} holds no instruction "
                                        f"once the Alpaca wrapper is removed")
        src = row.get(cmap["source"])
        return Conversation([("user", instruction), ("assistant", response)], instruction, "", response,
                            src if isinstance(src, str) else None)
    if schema == "alpaca":
        instruction = _field(row, cmap["instruction"], where, number)
        inp = _field(row, cmap["input"], where, number, optional=True)
        output = _field(row, cmap["output"], where, number)
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        return Conversation([("user", user), ("assistant", output)], instruction, inp, output)
    turns = _messages(row, cmap["messages"], where, number)
    users = [c for r, c in turns if r == "user"]
    answers = [c for r, c in turns if r == "assistant"]
    return Conversation(turns, users[0], "", answers[0])


# --------------------------------------------------------------------------------------------------
# conversations -> examples
# --------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """kind 'bos' | 'eos' (train = its label flag) | 'text' (pieces [(str, train)] encoded as ONE string;
    `specials` = parse special-token strings in it, for rendered chat templates)."""
    kind: str
    pieces: list = field(default_factory=list)
    train: bool = False
    specials: bool = False


@dataclass
class Example:
    segments: list
    text: str        # the whole training text, <s>/</s> written literally
    prompt: str      # what the model is given at generation time (no <s>: bos is added as an id)
    reference: str   # the answer after `prompt`
    n_prompt_segments: int = 0  # segments[:n] precede the prompt's end (-1: chat-template, see prompt_render)
    prompt_render: str = ""     # chat-template: the rendered generation prompt including its bos text


def _bt(conv: Conversation, top: bool) -> Example:
    prompt = "[INST]" + BACKTRANSLATE_TASK + "\n" + conv.response + "[/INST]"
    answer = conv.instruction if not conv.input.strip() else conv.instruction + "\n\n" + conv.input
    segs = [Segment("bos"), Segment("text", [(prompt, top), (answer, True)]), Segment("eos", train=True)]
    return Example(segs, "<s>" + prompt + answer + "</s>", prompt, answer, 1)


def _alpaca(conv: Conversation, top: bool) -> Example:
    if conv.input.strip():
        prompt = ALPACA_WITH_INPUT.format(instruction=conv.instruction, input=conv.input)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=conv.instruction)
    segs = [Segment("bos"), Segment("text", [(prompt, top), (conv.response, True)]), Segment("eos", train=True)]
    return Example(segs, "<s>" + prompt + conv.response + "</s>", prompt, conv.response, 1)


def _mixtral_chat(conv: Conversation, top: bool) -> Example:
    # as mistral-common: empty system messages are dropped, the others joined (whitespace-only ones kept)
    systems = [c for r, c in conv.turns if r == "system" and c]
    system = "\n\n".join(systems)
    segs, text, prompt_text = [Segment("bos")], "<s>", ""
    first_user, n_prompt, last_answer = True, 1, ""
    for role, content in conv.turns:
        if role == "user":
            c = (system + "\n\n" + content) if (first_user and system) else content
            first_user = False
            inst = f"[INST] {c} [/INST]"
            segs.append(Segment("text", [(inst, top)]))
            text += inst  # "</s>[INST]" like "<s>[INST]": the sentencepiece dummy prefix is not a text space
        elif role == "assistant":
            prompt_text, n_prompt, last_answer = text[3:], len(segs), content
            segs.append(Segment("text", [(content, True)]))
            segs.append(Segment("eos", train=True))
            text += " " + content + "</s>"
    return Example(segs, text, prompt_text, last_answer, n_prompt)


def _chat_template(conv: Conversation, top: bool, tokenizer) -> Example:
    tmpl = getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise DataError(f"data.template: chat-template needs a tokenizer with a chat_template, and "
                        f"{getattr(tokenizer, 'name', 'this tokenizer')} has none (use mixtral-chat, or set "
                        f"model.tokenizer to a tokenizer that has one)")
    hf = tokenizer.hf
    msgs = [{"role": r, "content": c} for r, c in conv.turns]

    def render(ms, gen):
        try:
            return hf.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja errors from a user-supplied template
            raise DataError(f"data.template: the tokenizer's chat_template failed to render ({e})") from None

    pieces, done, prompt, answer = [], "", "", ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError("data.template: the tokenizer's chat_template does not render conversations "
                            "incrementally (a prefix of the conversation is not a prefix of its text); the "
                            "answer positions cannot be found for the loss mask")
        pieces += [(before[len(done):], top), (upto[len(before):], True)]
        done, prompt, answer = upto, before, m["content"]
    full = render(msgs, False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done):], top))
    bos = getattr(hf, "bos_token", None) or ""
    gen_prompt = prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
    return Example([Segment("text", [p for p in pieces if p[0]], specials=True)], full, gen_prompt, answer, -1,
                   prompt)


def render_example(template: str, conv: Conversation, train_on_prompt: bool, tokenizer=None) -> Example:
    if template == "backtranslate":
        return _bt(conv, train_on_prompt)
    if template == "mixtral-chat":
        return _mixtral_chat(conv, train_on_prompt)
    if template == "alpaca":
        return _alpaca(conv, train_on_prompt)
    if template == "chat-template":
        return _chat_template(conv, train_on_prompt, tokenizer)
    raise DataError(f"data.template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def format_generation_prompt(template: str, text: str, tokenizer: Any = None) -> str:
    """Wrap a raw user prompt the way `template` wraps prompts in training (no `<s>`: bos is added as an id).

    backtranslate: text is the response to back-translate -> "[INST]Use the provided input...\\n{text}[/INST]";
    mixtral-chat: "[INST] {text} [/INST]"; alpaca: the Alpaca prompt with text as the instruction;
    chat-template: the tokenizer's template with a generation prompt (pass `tokenizer`).
    """
    if template == "backtranslate":
        return "[INST]" + BACKTRANSLATE_TASK + "\n" + text + "[/INST]"
    if template == "mixtral-chat":
        return f"[INST] {text} [/INST]"
    if template == "alpaca":
        return ALPACA_NO_INPUT.format(instruction=text)
    if template == "chat-template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template: chat-template prompts need a tokenizer with a chat_template")
        out = tokenizer.hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        bos = getattr(tokenizer.hf, "bos_token", None) or ""
        return out[len(bos):] if bos and out.startswith(bos) else out
    raise DataError(f"data.template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
