"""Rows -> conversations: the column schemas a dataset can have, validated row by row.

Schemas (picked from the columns of the first decodable row, after `data.columns` mapping; the template decides
which ones it can read):
  instruct     : `prompt` (instruct-v3's Alpaca-wrapped instruction), `response`  (+ `source`, unused)
  alpaca       : `instruction`, `output`, optional `input`
  chat         : `messages` = OpenAI messages [{"role": "system"|"user"|"assistant"|"tool"|"function",
                 "content": str, ...}, ...] (+ optional `tools`: the function schemas, a list or a JSON string)
  sharegpt     : `conversations` = [{"from": "human"|"gpt"|"system"|"tool", "value": str}, ...]
  text         : `text` = one raw document (data.template text: continued pretraining)

Every error names the file, the row and the column (a `BadRow`, counted under data.skip_bad_rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from .sources import BadRow, DataError

LOGICAL_COLUMNS = ("prompt", "response", "source", "instruction", "input", "output", "messages", "conversations",
                   "tools", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
CHAT_ROLES = ("system", "user", "assistant", "tool", "function")
TOOL_ROLES = ("tool", "function")

# instruct-v3's wrapper and the recipe's recovery of the instruction from it (SPEC.md §1).
INSTRUCT_V3_SYSTEM = ("Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.")
INSTRUCT_V3_WRAPPER = INSTRUCT_V3_SYSTEM + "\n\n### Instruction\n{instruction}\n\n### Response\n"


def recover_instruction(prompt: str) -> str:
    """The recipe's recovery: drop the system sentence, "\\n\\n### Instruction\\n", "\\n### Response\\n"; strip."""
    return (prompt.replace(INSTRUCT_V3_SYSTEM, "").replace("\n\n### Instruction\n", "")
            .replace("\n### Response\n", "").strip())


def wrap_instruction(instruction: str) -> str:
    """instruct-v3's `prompt` field for an instruction (used to write the bundled data)."""
    return INSTRUCT_V3_WRAPPER.format(instruction=instruction)


@dataclass
class Conversation:
    """A normalised row: turns [(role, content)], plus the instruction/input/response view of single turns.

    `messages` are the turns as chat-template messages (role/content plus any other keys the row carried:
    tool_calls, name, tool_call_id, reasoning_content); `tools` the function schemas; `text` a raw document."""
    turns: list  # [(role, content)], roles system/user/assistant/tool/function, ends with an assistant turn
    instruction: str = ""
    input: str = ""
    response: str = ""
    source: Optional[str] = None
    messages: list = field(default_factory=list)
    tools: Optional[list] = None
    text: Optional[str] = None

    @property
    def has_tools(self) -> bool:
        return any(r in TOOL_ROLES for r, _ in self.turns) or any(m.get("tool_calls") for m in self.messages)


def column_map(mapping: dict) -> dict:
    bad = [k for k in mapping if k not in LOGICAL_COLUMNS]
    if bad:
        raise DataError(f"data.columns: unknown key {bad[0]!r}; keys are {', '.join(LOGICAL_COLUMNS)}")
    return {k: str(mapping.get(k, k)) for k in LOGICAL_COLUMNS}


def detect_schema(columns: set, cmap: dict, where: str, first_row: int = 1, template: str = "") -> str:
    """The schema of rows with these columns (those of the first decodable row) for `template`."""
    have = ", ".join(sorted(columns)) or "none"
    absent = [(k, v) for k, v in cmap.items() if v != k and v not in columns]
    if template == "text":
        if cmap["text"] in columns:
            return "text"
        how = (f"data.columns maps text to it" if cmap["text"] != "text" else
               "map yours with --data.columns '{text: my_column}'")
        raise DataError(f"{where}: row {first_row}: missing column {cmap['text']!r} for data.template text ({how}; "
                        f"the rows have: {have})")
    for schema, col in (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"),
                        ("instruct", "prompt")):
        if cmap[col] in columns:
            return schema
    if absent:  # the user's mapping names a column the data does not have: say which
        k, v = absent[0]
        raise DataError(f"{where}: row {first_row}: missing column {v!r} (data.columns maps {k} to it; the "
                        f"rows have: {have})")
    if cmap["text"] in columns:
        raise DataError(f"{where}: row {first_row}: only a {cmap['text']!r} column (raw text): use "
                        f"--data.template text for continued pretraining, or give prompt/response, "
                        f"instruction/output, messages or conversations columns for data.template {template}")
    raise DataError(f"{where}: no known columns (have: {have}); expected prompt/response (instruct-v3), "
                    f"instruction/input/output (Alpaca), messages (chat), conversations (ShareGPT) or text "
                    f"(raw text, data.template text); map yours with "
                    f"--data.columns '{{prompt: my_col, response: my_col2}}'")


SCHEMA_COLUMNS = {"instruct": ("prompt", "response"), "alpaca": ("instruction", "output"), "chat": ("messages",),
                  "sharegpt": ("conversations",), "text": ("text",)}


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


def _schema_mismatch(row: dict, schema: str, cmap: dict, where: str, number: int, first_row: int) -> None:
    """A row of another schema than the file's (set by its first row): name this row, not the first."""
    need = [cmap[c] for c in SCHEMA_COLUMNS[schema]]
    missing = [c for c in need if c not in row]
    if missing and first_row != number:
        have = ", ".join(sorted(map(str, row))) or "none"
        raise BadRow("missing_column", f"{where}: row {number}: missing column {missing[0]!r}: the file's "
                                       f"schema is {schema} (set by row {first_row}) but this row has: {have}")


def _turn_list(row: dict, col: str, where: str, number: int, what: str) -> list:
    if col not in row:
        raise BadRow("missing_column", f"{where}: row {number}: missing column {col!r}")
    msgs = row[col]
    if msgs is None:
        raise BadRow("null_value", f"{where}: row {number}: column {col!r} is null")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise BadRow("bad_messages", f"{where}: row {number}: column {col!r} must be a non-empty list of "
                                     f"{what} objects")
    return list(msgs)


def _message(m, at: str, sharegpt: bool) -> dict:
    """One message/turn -> a chat-template message {"role", "content", ...extras}."""
    if not isinstance(m, dict):
        raise BadRow("bad_messages", f"{at}: expected an object with " + ("from and value" if sharegpt else
                                                                          "role and content"))
    if "from" in m or "role" in m:  # each message's own keys decide (ShareGPT columns with role/content exist)
        sharegpt = "from" in m
    if sharegpt:
        who = m.get("from")
        if who not in SHAREGPT_ROLES:
            raise BadRow("bad_messages", f"{at}: unknown role (from) {who!r}; ShareGPT roles are human, gpt, system, "
                                     f"tool")
        out = {k: v for k, v in m.items() if k not in ("from", "value")}
        out.update(role=SHAREGPT_ROLES[who], content=m.get("value"))
    else:
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise BadRow("bad_messages", f"{at}: role {role!r} is not system, user, assistant, tool or function")
        out = dict(m)
    role, content = out["role"], out.get("content")
    key = "value" if sharegpt else "content"
    calls = out.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise BadRow("bad_messages", f"{at}: tool_calls must be a list, on an assistant message")
    if content is None and role == "assistant" and calls:
        out["content"] = content = ""  # a tool-calling turn without text
    if content is None:
        raise BadRow("null_value", f"{at}: {key} is null")
    if not isinstance(content, str):
        raise BadRow("not_string", f"{at}: {key} is not a string (got {type(content).__name__})")
    if not content.strip() and role != "system" and not calls:  # an empty system prompt is no system prompt
        raise BadRow("empty_value", f"{at}: {key} is empty")
    _check_text(content, f"{at}: {key}")
    return out


_NEXT = {None: ("user",), "system": ("user",), "user": ("assistant",), "assistant": ("user", "tool", "function"),
         "tool": ("tool", "function", "assistant"), "function": ("tool", "function", "assistant")}


def _conversation_turns(row: dict, col: str, where: str, number: int, sharegpt: bool) -> list:
    msgs = _turn_list(row, col, where, number, "{from, value}" if sharegpt else "{role, content}")
    noun = "turn" if sharegpt else "message"
    out = [_message(m, f"{where}: row {number}: column {col!r}: {noun} {i}", sharegpt)
           for i, m in enumerate(msgs, start=1)]
    # System messages only at the start; then a user turn, answers after users or tool results.
    k = 0
    while k < len(out) and out[k]["role"] == "system":
        k += 1
    prev = None
    for i in range(k, len(out)):
        role = out[i]["role"]
        if role not in _NEXT[prev]:
            after = f"after {prev!r}" if prev else "first after any system messages"
            raise BadRow("bad_messages", f"{where}: row {number}: column {col!r}: {noun} {i + 1} has role "
                                         f"{role!r}, expected {' or '.join(map(repr, _NEXT[prev]))} ({after}; "
                                         f"system first, then user/assistant alternating, tool results after a "
                                         f"tool call)")
        prev = role
    while out and out[-1]["role"] != "assistant":
        out.pop()  # a trailing user turn has no answer to learn
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("bad_messages", f"{where}: row {number}: column {col!r}: no assistant turn to train on")
    return out


def _tools(row: dict, col: str, where: str, number: int) -> Optional[list]:
    v = row.get(col)
    if v is None or v == "":
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise BadRow("bad_messages", f"{where}: row {number}: column {col!r}: not valid JSON ({e.msg})") from None
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise BadRow("bad_messages", f"{where}: row {number}: column {col!r} must be a list of function "
                                     f"schemas (objects)")
    return v


def to_conversation(row: dict, schema: str, cmap: dict, where: str, number: int, first_row: int = 0) -> Conversation:
    """Validate one row of `schema` and normalise it; raises BadRow naming file, row and column."""
    cmap = {**{k: k for k in LOGICAL_COLUMNS}, **cmap}
    if first_row:
        _schema_mismatch(row, schema, cmap, where, number, first_row)
    if schema == "text":
        doc = _field(row, cmap["text"], where, number)
        return Conversation([], text=doc)
    if schema == "instruct":
        prompt = _field(row, cmap["prompt"], where, number)
        response = _field(row, cmap["response"], where, number)
        instruction = recover_instruction(prompt)
        if not instruction:
            raise BadRow("empty_value", f"{where}: row {number}: column {cmap['prompt']!r} holds no instruction "
                                        f"once the Alpaca wrapper is removed")
        src = row.get(cmap["source"])
        turns = [("user", instruction), ("assistant", response)]
        return Conversation(turns, instruction, "", response, src if isinstance(src, str) else None,
                            [{"role": r, "content": c} for r, c in turns])
    if schema == "alpaca":
        instruction = _field(row, cmap["instruction"], where, number)
        inp = _field(row, cmap["input"], where, number, optional=True)
        output = _field(row, cmap["output"], where, number)
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        turns = [("user", user), ("assistant", output)]
        return Conversation(turns, instruction, inp, output, messages=[{"role": r, "content": c} for r, c in turns])
    sharegpt = schema == "sharegpt"
    msgs = _conversation_turns(row, cmap["conversations" if sharegpt else "messages"], where, number, sharegpt)
    turns = [(m["role"], m["content"]) for m in msgs]
    users = [c for r, c in turns if r == "user"]
    answers = [c for r, c in turns if r == "assistant"]
    return Conversation(turns, users[0], "", answers[0], messages=msgs, tools=_tools(row, cmap["tools"], where, number))
