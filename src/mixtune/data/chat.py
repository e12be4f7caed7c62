"""`data.template: chat-template`: the tokenizer's own Jinja chat template, with the loss on the answers.

The ids are exactly transformers' `apply_chat_template(messages, tokenize=True)`: the conversation is rendered
once, whole, and its text is encoded with special-token strings parsed as specials (what transformers does).
The loss mask is found in that text, turn by turn:

- an answer starts where the template's generation prompt for it ends (`apply_chat_template(messages[:i],
  add_generation_prompt=True)`): what the model is given at generation time is never a label, and everything
  it must produce is. For Qwen3 that includes the `<think>...</think>` block of the last answer (the template
  writes historical answers without their reasoning, and so do the labels) unless `enable_thinking: false`
  puts an empty block into the generation prompt;
- an answer ends with the template's end-of-turn marker, found by rendering a probe conversation
  (`<|im_end|>` for ChatML, `</s>` or `<|eot_id|>` elsewhere). The marker carries loss (it is how the model
  learns to stop; for Qwen3 it is the eos). The whitespace a template writes after it (ChatML's "\\n" before
  the next `<|im_start|>`) is not a label: generation stops at the marker and never produces it.

Templates that render a turn differently once later turns exist are handled: Qwen3 writes answers before the last
user query without their reasoning, and the last one with a think block (empty when it has none). Where the text
leaves the generation prompt inside it (an empty think block in the prompt under `enable_thinking: false`, none
in a historical answer), the loss starts there; where an earlier part renders differently, the answer's start is
found after the previous answer by its generation prompt's header (e.g. "<|im_start|>assistant\\n").
`data.chat_template_kwargs` (e.g. `{enable_thinking: false}`) are passed to every render, as
`apply_chat_template(..., **kwargs)` takes them. Tool messages a template silently drops are an error.
"""

from __future__ import annotations

import os

from .schemas import Conversation
from .sources import BadRow, DataError

_PROBE = "mixtuneprobeanswer"


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template (and fixed template kwargs)."""

    def __init__(self, tokenizer, kwargs: dict | None = None):
        tmpl = getattr(tokenizer, "chat_template", None)
        if not tmpl:
            raise DataError(f"data.template: chat-template needs a tokenizer with a chat_template, and "
                            f"{getattr(tokenizer, 'name', 'this tokenizer')} has none (use mixtral-chat, or set "
                            f"model.tokenizer to a tokenizer that has one)")
        self.hf = tokenizer.hf
        self.kwargs = dict(kwargs or {})
        self.eot = self._end_of_turn()

    def render(self, msgs: list, gen: bool, tools=None, at: str = "") -> str:
        try:
            return self.hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen,
                                               **self.kwargs)
        except Exception as e:  # noqa: BLE001 - jinja errors from a user-supplied template
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadRow("template_error", f"{at + ': ' if at else ''}data.template: the tokenizer's "
                                           f"chat_template failed to render ({first})") from None

    def _end_of_turn(self) -> str:
        """The marker the template writes right after an answer (stripped of whitespace), or ''."""
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], False)
        except BadRow:
            return ""
        k = text.rfind(_PROBE)
        return text[k + len(_PROBE):].strip() if k >= 0 else ""

    def generation_prompt(self, text: str) -> str:
        """A user prompt as the template's generation prompt (its own bos text included)."""
        return self.render([{"role": "user", "content": text}], True)

    def example(self, conv: Conversation, top: bool, at: str = ""):
        """-> (pieces [(text, train)], full text, generation prompt of the last answer, last answer)."""
        msgs = conv.messages or [{"role": r, "content": c} for r, c in conv.turns]
        full = self.render(msgs, False, conv.tools, at)
        for m in msgs:  # a role the template silently skips (no tool support) must not vanish from the data
            if m["role"] in ("tool", "function") and m["content"].strip() and m["content"].strip() not in full:
                raise BadRow("unsupported_role", f"{at}: the tokenizer's chat_template does not render "
                                                 f"{m['role']!r} messages; drop them or use a template that "
                                                 f"supports tools")
        pieces, done, prompt, answer = [], 0, "", ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            base = self.render(msgs[:i], False, conv.tools, at)
            before = self.render(msgs[:i], True, conv.tools, at)
            start = self._answer_start(full, done, base, before, i, at)
            end = self._answer_end(full, start, msgs[: i + 1], conv.tools, i == len(msgs) - 1, i, at)
            pieces += [(full[done:start], top), (full[start:end], True)]
            done, prompt, answer = end, before, m["content"]
        pieces.append((full[done:], top))
        return [p for p in pieces if p[0]], full, prompt, answer

    def _answer_start(self, full: str, done: int, base: str, before: str, i: int, at: str) -> int:
        if full.startswith(before) and len(before) >= done:
            return len(before)
        n = len(os.path.commonprefix([full, before]))  # characters the two renderings share
        if n >= done and n >= len(base) and full.startswith(base):
            # the text leaves the generation prompt inside it (enable_thinking false puts an empty think block
            # there; a historical answer has none, a final one with reasoning has its own): learn from there
            return n
        gp = before[len(base):] if before.startswith(base) else ""
        if gp:  # the conversation before this answer renders differently once it continues: find its header
            k = full.find(gp, done)
            if k >= 0:
                return k + len(gp)
        raise BadRow("template_error", f"{at}: message {i + 1}: the tokenizer's chat_template renders this "
                                       f"answer's prompt differently inside the conversation; the answer's "
                                       f"position cannot be found for the loss mask")

    def _answer_end(self, full: str, start: int, upto_msgs: list, tools, last: bool, i: int, at: str) -> int:
        if self.eot:
            k = full.find(self.eot, start)
            if k >= 0:
                return k + len(self.eot)
        upto = self.render(upto_msgs, False, tools, at)
        if full.startswith(upto) and len(upto) > start:
            return len(upto)
        if last:
            return len(full)
        raise BadRow("template_error", f"{at}: message {i + 1}: cannot find where this answer ends in the "
                                       f"tokenizer's chat_template rendering")
