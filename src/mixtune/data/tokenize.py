"""Examples -> token ids and labels (the loss mask), and overlong handling.

A text segment's pieces are encoded together as ONE string (so the recipe's "...[/INST]instruction" tokenizes
exactly as the whole string would); the boundary between pieces is the longest common prefix of the ids of
the text up to the boundary and the ids of the whole segment, so a token that straddles a boundary belongs to
the later piece. Labels are the input ids (unshifted) where the piece trains, -100 elsewhere. The first token
of every example (bos) is never a label: with packing, a label there would be predicted from the previous
example's last token.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Optional

from .templates import Conversation, Example, render_example

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list
    labels: list
    prompt_ids: list  # bos + the generation prompt's ids (what generation is given), [] when not known
    truncated: bool = False


def _encode_segment(seg, tokenizer) -> tuple[list, list, list]:
    """-> (ids of the whole segment, per-id train flags, ids of the first piece encoded alone)."""
    enc = tokenizer.encode_with_specials if seg.specials else tokenizer.encode_content
    texts = [p[0] for p in seg.pieces]
    full = enc("".join(texts))
    flags = [False] * len(full)
    start, prefix, first = 0, "", None
    for k, (text, train) in enumerate(seg.pieces):
        prefix += text
        if k == len(seg.pieces) - 1:
            end = len(full)
        else:
            pre = enc(prefix)
            first = pre if first is None else first
            end = max(start, len(os.path.commonprefix([pre, full])))  # ids shared with the prefix
        for j in range(start, end):
            flags[j] = train
        start = end
    return full, flags, first


def _special_id(tokenizer, piece: str) -> int:
    i = tokenizer.special_id(piece) if hasattr(tokenizer, "special_id") else None
    if i is None:
        from .sources import DataError

        raise DataError(f"data.template: tokenizer {getattr(tokenizer, 'name', '')} has no {piece} control token "
                        f"(mixtral-v3-chat needs the v3 tokenizer: --model.tokenizer mistral-common:v3, or the "
                        f"checkpoint's own)")
    return i


def tokenize_example(ex: Example, tokenizer) -> Tokenized:
    ids, flags, seg_ends, firsts = [], [], [], []
    for seg in ex.segments:
        if seg.kind == "bos":
            if tokenizer.bos_id is not None:  # some Hub tokenizers have none (bos_token null)
                ids.append(tokenizer.bos_id)
                flags.append(False)
        elif seg.kind == "eos":
            ids.append(tokenizer.eos_id)
            flags.append(seg.train)
        elif seg.kind == "special":
            for piece, train in seg.pieces:
                ids.append(_special_id(tokenizer, piece))
                flags.append(train)
        else:
            t, f, first = _encode_segment(seg, tokenizer)
            firsts.append((len(seg_ends), first))
            ids += t
            flags += f
        seg_ends.append(len(ids))
    if flags:
        flags[0] = False
    labels = [i if f else IGNORE for i, f in zip(ids, flags)]
    n = ex.n_prompt_segments
    if n < 0:  # chat-template: the rendered prompt (with its own bos text) parsed with specials
        prompt_ids = tokenizer.encode_with_specials(ex.prompt_render)
    else:
        prompt_ids = ids[: seg_ends[n - 1]] if n else []
        nxt = ex.segments[n] if n < len(ex.segments) else None
        if nxt is not None and nxt.kind == "text" and len(nxt.pieces) > 1:
            # the prompt ends inside this segment (backtranslate, alpaca): generation encodes it alone
            first = dict(firsts).get(n)
            if first is None or nxt.pieces[0][0] != ex.prompt:
                first = tokenizer.encode_content(ex.prompt)
            prompt_ids = prompt_ids + first
    return Tokenized(ids, labels, prompt_ids)


def split_document(tok: Tokenized, max_len: int) -> list:
    """Raw text: a document longer than max_len becomes consecutive pieces of max_len tokens (every token kept;
    each piece is its own document in a packed row, so its first token is not a label)."""
    if len(tok.input_ids) <= max_len:
        return [tok]
    out = []
    for k in range(0, len(tok.input_ids), max_len):
        ids, labels = tok.input_ids[k:k + max_len], list(tok.labels[k:k + max_len])
        labels[0] = IGNORE
        out.append(Tokenized(ids, labels, tok.prompt_ids if k == 0 else []))
    return out


def fit_length(tok: Tokenized, max_len: int, overlong: str) -> Tokenized | None:
    """Truncate (keep the first max_len tokens) or drop (None) an example longer than max_len."""
    if len(tok.input_ids) <= max_len:
        return tok
    if overlong == "drop":
        return None
    return Tokenized(tok.input_ids[:max_len], tok.labels[:max_len], tok.prompt_ids, truncated=True)


def encode_generation_prompt(template: str, text: str, tokenizer, template_kwargs: Optional[dict] = None) -> list:
    """The ids a model trained with `template` is given for a raw user prompt: exactly the training prefix of
    an answer (bos as an id where the tokenizer has one; control tokens as ids; specials of a chat template
    parsed). For `text` (raw text) it is bos + the text's ids."""
    if template == "text":
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return bos + tokenizer.encode_content(text)
    if template == "backtranslate":
        conv = Conversation([("user", "x"), ("assistant", text)], "x", "", text)
    else:
        conv = Conversation([("user", text), ("assistant", "x")], text, "", "x")
    ex = render_example(template, conv, False, tokenizer, template_kwargs, "prompt")
    return list(tokenize_example(ex, tokenizer).prompt_ids)
