"""`mixtune generate`: load the base (+ adapter), format each prompt as in training, decode with a KV cache.

    generate_main(cfg, ["Write a haiku"], adapter=None, json_out=True)     # the CLI verb
    from mixtune.generate import generate                                   # the decoder (model/sampling.py)
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from .model.sampling import generate, sample_next  # noqa: F401  (the public decoding API, re-exported)
from .runtime import resolve_device, resolve_dtype


PROMPT_MODES = {"template": None, "raw": "text", "chat": "chat-template"}


def generate_main(cfg, prompts: list[str], adapter: Optional[str] = None, json_out: bool = False,
                  stream=None, mode: str = "template") -> list[dict]:
    """The `mixtune generate` verb: load cfg.model (+ the adapter), turn each prompt into ids, decode with
    cfg.generate, print each result (the text; with json_out one JSON object per line: prompt, formatted_prompt,
    text, token_ids, prompt_tokens) and return them.
    mode: "template" (default) wraps the prompt as data.template does in training; "raw" (`--raw`) sends exactly
    bos (where the tokenizer has one) + the prompt's ids; "chat" (`--chat`) sends the prompt as one user turn
    through the tokenizer's own chat template with the generation prompt. Ids come from
    `data.encode_generation_prompt` (bos only where the tokenizer has one, control tokens as ids).
    Context rule (model.sampling.generate): new tokens are capped, with a notice on stderr, so that prompt + new
    tokens fit the model's max_position_embeddings; a prompt that fills the context alone is refused."""
    from .data import encode_generation_prompt, format_generation_prompt, load_tokenizer
    from .model import load_model, resolve_model_path

    if mode not in PROMPT_MODES:
        raise ValueError(f"generate: unknown prompt mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}")
    template = PROMPT_MODES[mode] or cfg.data.template
    kwargs = cfg.data.chat_template_kwargs or None
    stream = stream or sys.stdout
    report = (lambda msg: print(msg, file=sys.stderr)) if json_out else print
    mc, gc = cfg.model, cfg.generate
    path = resolve_model_path(mc.name_or_path, mc.cache_dir, mc.revision, family=mc.family)
    device = resolve_device(mc.device)
    model = load_model(path, quant=mc.quant, dtype=resolve_dtype(mc.dtype, device), device=device,
                       cache_dir=mc.cache_dir, revision=mc.revision, report=report)
    model.attn_implementation = mc.attn_implementation
    model.set_moe_backend(mc.moe_backend)
    if adapter:
        from .lora import load_adapter

        load_adapter(model, adapter)
    tok = load_tokenizer(mc.tokenizer, path)
    results = []
    for text in prompts:
        formatted = format_generation_prompt(template, text, tok, kwargs)
        # the training prefix's exact ids: a literal "</s>" in the user's text stays text, never an eos id
        ids = encode_generation_prompt(template, text, tok, kwargs)
        new = generate(model, [ids], max_new_tokens=gc.max_new_tokens, greedy=gc.greedy,
                       temperature=gc.temperature, top_p=gc.top_p, top_k=gc.top_k, seed=gc.seed,
                       eos_id=tok.eos_id, notice=lambda msg: print(f"mixtune: {msg}", file=sys.stderr))[0]
        rec = {"prompt": text, "formatted_prompt": formatted, "text": tok.decode(new),
               "token_ids": new, "prompt_tokens": len(ids),
               "stopped_at_eos": bool(new) and new[-1] == tok.eos_id}
        results.append(rec)
        print(json.dumps(rec, ensure_ascii=False) if json_out else rec["text"], file=stream, flush=True)
    return results
