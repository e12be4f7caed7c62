"""`mixtune eval`: loss / perplexity of the base model, or base + adapter, on the configured eval split.

    mixtune eval [CONFIG] --adapter runs/tiny/adapter [--json]
    eval_main(cfg, adapter="runs/tiny/adapter", json_out=True)

The measurement itself is `mixtune.loop.evaluation.evaluate_loss`, the same the training loop uses.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from .loop.evaluation import evaluate_loss
from .runtime import resolve_device, resolve_dtype, use_bf16


def eval_main(cfg, adapter: Optional[str] = None, json_out: bool = False) -> dict[str, Any]:
    """Evaluation loss / perplexity of the base model (or base + adapter) on the configured eval split."""
    from .data import load_tokenizer, prepare_data
    from .model import load_model, resolve_model_path

    t0 = time.time()
    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter: directory not found: {adapter}")
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision,
                                    family=cfg.model.family)
    tokenizer = load_tokenizer(cfg.model.tokenizer, model_path)
    data = prepare_data(cfg, tokenizer)
    if not data.eval_rows:
        raise ValueError(f"no evaluation rows: {data.stats.get('eval_note') or 'set data.eval_fraction > 0 or data.eval_split'}")
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    bf16 = use_bf16(cfg, device, dtype)
    report = (lambda msg: print(msg, file=sys.stderr)) if json_out else print
    model = load_model(model_path, quant=cfg.model.quant, dtype=dtype,
                       device=device, cache_dir=cfg.model.cache_dir, revision=cfg.model.revision, report=report)
    model.set_moe_backend(cfg.model.moe_backend)
    model.attn_implementation = cfg.model.attn_implementation
    if adapter:
        from .lora import load_adapter
        load_adapter(model, adapter)
    metrics = evaluate_loss(model, data.eval_rows, cfg.train.per_device_eval_batch_size, autocast=bf16)
    if not math.isfinite(metrics["eval_loss"]):  # finite weights whose products overflow (a diverged adapter)
        print(f"mixtune: warning: the evaluation loss is {metrics['eval_loss']}: the model's outputs overflow "
              f"(nan/inf){'; is the adapter from a diverged run?' if adapter else ''}", file=sys.stderr)
    result = {"model": cfg.model.name_or_path or "tiny-default", "adapter": adapter or None,
              "eval_rows": len(data.eval_rows), **metrics, "seconds": round(time.time() - t0, 2)}
    if json_out:
        print(json.dumps(result))
    else:
        print(f"eval loss {metrics['eval_loss']:.4f}  perplexity {metrics['eval_perplexity']:.2f}  "
              f"({metrics['eval_tokens']} tokens, {len(data.eval_rows)} rows"
              f"{', adapter ' + adapter if adapter else ', base model'})", file=sys.stdout)
    return result
