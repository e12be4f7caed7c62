"""Conversations -> prompt formats (with the loss mask), byte- and token-exact.

Rows become `Conversation`s in schemas.py (instruct, alpaca, chat messages, ShareGPT, raw text).

Templates (`data.template`):
  backtranslate    the reference recipe: bos + "[INST]Use the provided input ... LLM.\\n" + response + "[/INST]"
                   + instruction + eos (the answer is the instruction), encoded as ONE SentencePiece string.
  mixtral-chat     mistral-common v1: bos, then per turn `[INST] {user} [/INST]` and the answer as separately
                   encoded segments, eos after every answer; a system message is prefixed to the first user turn.
  mixtral-v3-chat  mistral-common v3 (Mixtral-8x22B): bos, then per turn the control tokens [INST] / [/INST]
                   around the user text, the answer (trailing spaces stripped) and eos; the system message is
                   prefixed to the LAST user turn (as mistral-common v2/v3 place it). Needs [INST]/[/INST]
                   control tokens (model.tokenizer mistral-common:v3 or the checkpoint's own).
  alpaca           the Stanford Alpaca prompt (with/without input), bos ... eos.
  chat-template    the tokenizer's own `chat_template` (chat.py: ids = transformers' apply_chat_template).
  text             raw text / continued pretraining: bos + document + eos, loss on every token (the first
                   token of a document has nothing before it to be predicted from: never a label).

Tool turns (role tool/function, assistant tool_calls) need chat-template: the other formats have no tool syntax
and refuse such rows. An `Example` is a list of segments; each text segment is encoded as one string and its
pieces carry the loss flag (see tokenize.py). `<s>`/`</s>` are ids, never text; in `Example.text` they are
rendered literally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .schemas import (INSTRUCT_V3_SYSTEM, INSTRUCT_V3_WRAPPER, LOGICAL_COLUMNS, Conversation,  # noqa: F401
                      column_map, detect_schema, recover_instruction, to_conversation, wrap_instruction)
from .sources import BadRow, DataError

TEMPLATES = ("backtranslate", "mixtral-chat", "mixtral-v3-chat", "alpaca", "chat-template", "text")

BACKTRANSLATE_TASK = ("Use the provided input to create an instruction that could have been used to generate "
                      "the response with an LLM.")

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


# --------------------------------------------------------------------------------------------------
# conversations -> examples
# --------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """kind 'bos' | 'eos' (train = its label flag) | 'special' (pieces [(token string, train)]: one control /
    special token each, by its string) | 'text' (pieces [(str, train)] encoded as ONE string; `specials` = parse
    special-token strings in it, for rendered chat templates)."""
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


def _system(conv: Conversation) -> str:
    # as mistral-common: empty system messages are dropped, the others joined (whitespace-only ones kept)
    return "\n\n".join(c for r, c in conv.turns if r == "system" and c)


def _mixtral_chat(conv: Conversation, top: bool) -> Example:
    system = _system(conv)
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


def _mixtral_v3_chat(conv: Conversation, top: bool) -> Example:
    """mistral-common v3 (InstructTokenizerV3, SentencePiece): [INST]/[/INST] are control ids, each user text and
    each answer is its own SentencePiece string (dummy prefix included), answers lose trailing spaces, the
    system prompt goes before the last user message's text."""
    system = _system(conv)
    last_user = max(i for i, (r, _) in enumerate(conv.turns) if r == "user")
    segs, text, prompt_text = [Segment("bos")], "<s>", ""
    n_prompt, last_answer = 1, ""
    for i, (role, content) in enumerate(conv.turns):
        if role == "user":
            c = (system + "\n\n" + content) if (i == last_user and system) else content
            segs += [Segment("special", [("[INST]", top)]), Segment("text", [(c, top)]),
                     Segment("special", [("[/INST]", top)])]
            text += f"[INST] {c}[/INST]"
        elif role == "assistant":
            answer = content.rstrip(" ")
            prompt_text, n_prompt, last_answer = text[3:], len(segs), answer
            if answer:
                segs.append(Segment("text", [(answer, True)]))
            segs.append(Segment("eos", train=True))
            text += " " + answer + "</s>"
    return Example(segs, text, prompt_text, last_answer, n_prompt)


def _text(conv: Conversation) -> Example:
    """A raw document: bos + text + eos, every token a label. The generation prompt (eval generations) is the
    document's head (up to a space near its middle, at most 400 characters), the reference its rest."""
    doc = conv.text or ""
    cut = doc.rfind(" ", 0, min(len(doc) // 2, 400) + 1)
    cut = cut if cut > 0 else min(len(doc) // 2, 400)
    head, tail = doc[:cut], doc[cut:]
    pieces = [(head, True), (tail, True)] if head and tail else [(doc, True)]
    segs = [Segment("bos"), Segment("text", pieces), Segment("eos", train=True)]
    return Example(segs, "<s>" + doc + "</s>", head if len(pieces) == 2 else "", tail if len(pieces) == 2 else doc,
                   1)


def _chat_template(conv: Conversation, top: bool, tokenizer, kwargs: Optional[dict], at: str) -> Example:
    renderer = _renderer(tokenizer, kwargs)
    pieces, full, prompt, answer = renderer.example(conv, top, at)
    bos = getattr(renderer.hf, "bos_token", None) or ""
    gen_prompt = prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
    return Example([Segment("text", pieces, specials=True)], full, gen_prompt, answer, -1, prompt)


_RENDERERS: dict = {}


def _renderer(tokenizer, kwargs: Optional[dict]):
    """One ChatRenderer per (tokenizer, kwargs): the end-of-turn probe is rendered once."""
    from .chat import ChatRenderer

    key = (id(tokenizer), repr(sorted((kwargs or {}).items())))
    hit = _RENDERERS.get(key)
    if hit is None or hit[0] is not tokenizer:
        if len(_RENDERERS) > 16:
            _RENDERERS.clear()
        hit = _RENDERERS[key] = (tokenizer, ChatRenderer(tokenizer, kwargs))
    return hit[1]


def render_example(template: str, conv: Conversation, train_on_prompt: bool, tokenizer=None,
                   template_kwargs: Optional[dict] = None, at: str = "") -> Example:
    """One conversation in `template`'s format. `at` ("file: row N") prefixes row errors; `template_kwargs` go
    to the chat template (chat-template only)."""
    if template == "text":
        if conv.text is None:
            raise BadRow("missing_column", f"{at}: data.template text needs a text column")
        return _text(conv)
    if template not in TEMPLATES:
        raise DataError(f"data.template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if conv.text is not None and not conv.turns:
        raise BadRow("missing_column", f"{at}: a raw-text row needs data.template text, not {template}")
    if template == "chat-template":
        return _chat_template(conv, train_on_prompt, tokenizer, template_kwargs, at)
    if conv.has_tools:
        raise BadRow("unsupported_role", f"{at}: tool turns (role tool/function or tool_calls) need "
                                         f"data.template chat-template with a template that renders them; "
                                         f"{template} has no tool syntax")
    if template == "backtranslate":
        return _bt(conv, train_on_prompt)
    if template == "mixtral-chat":
        return _mixtral_chat(conv, train_on_prompt)
    if template == "mixtral-v3-chat":
        return _mixtral_v3_chat(conv, train_on_prompt)
    return _alpaca(conv, train_on_prompt)


def format_generation_prompt(template: str, text: str, tokenizer: Any = None,
                             template_kwargs: Optional[dict] = None) -> str:
    """Wrap a raw user prompt the way `template` wraps prompts in training (no `<s>`: bos is added as an id).

    backtranslate: text is the response to back-translate -> "[INST]Use the provided input...\\n{text}[/INST]";
    mixtral-chat: "[INST] {text} [/INST]"; mixtral-v3-chat: "[INST] {text}[/INST]" (the markers are control ids:
    encode with `encode_generation_prompt`); alpaca: the Alpaca prompt with text as the instruction;
    chat-template: the tokenizer's template with a generation prompt (pass `tokenizer`); text: the text itself.
    """
    if template == "backtranslate":
        return "[INST]" + BACKTRANSLATE_TASK + "\n" + text + "[/INST]"
    if template == "mixtral-chat":
        return f"[INST] {text} [/INST]"
    if template == "mixtral-v3-chat":
        return f"[INST] {text}[/INST]"
    if template == "alpaca":
        return ALPACA_NO_INPUT.format(instruction=text)
    if template == "text":
        return text
    if template == "chat-template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template: chat-template prompts need a tokenizer with a chat_template")
        out = _renderer(tokenizer, template_kwargs).generation_prompt(text)
        bos = getattr(tokenizer.hf, "bos_token", None) or ""
        return out[len(bos):] if bos and out.startswith(bos) else out
    raise DataError(f"data.template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
