"""Why is a `mixtune train` step slower than the benchmark's step? Time the same model and batch through
`mixtune.loop.step.forward_backward` with each difference switched on/off (autocast, router aux loss, LoRA dropout), then
profile the slowest. Run on a GPU:  PYTHONPATH=src python3 bench/train_step_diag.py --layers 2
"""

import argparse
import json
import time

import torch

from mixtune.bench import packed_batch
from mixtune.config import load_config
from mixtune.lora import apply_lora, lora_parameters
from mixtune.model.config import MixtralConfig
from mixtune.model.random_init import build_random_nf4_model
from mixtune.loop.step import forward_backward


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu-small", action="store_true", help="dry run of this script on CPU")
    a = p.parse_args()
    dev = torch.device("cpu" if a.cpu_small else "cuda")
    small = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    cfg = MixtralConfig(num_hidden_layers=a.layers, **(small if a.cpu_small else {}))
    seq = 256 if a.cpu_small else 1024
    model = build_random_nf4_model(cfg, device=dev, seed=0)
    rows = []
    for dropout in (0.05, 0.0):
        c = load_config("configs/mixtral-8x7b-qlora.yaml", ["--lora.dropout", str(dropout)])
        if dropout == 0.05:
            apply_lora(model, c.lora, 0)
        else:
            for m in model.modules():
                if hasattr(m, "dropout") and isinstance(m.dropout, torch.nn.Dropout):
                    m.dropout = torch.nn.Identity()
        model.train()
        model.gradient_checkpointing = True
        params = lora_parameters(model)
        opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == 'cuda')
        batches = []
        for i in range(2):
            ids, lab, pos = packed_batch(a.mb, seq, cfg.vocab_size, dev, i)
            batches.append({"input_ids": ids, "labels": lab, "position_ids": pos})
        for bf16 in (True, False):
            for aux in (0.02, 0.0):
                times = []
                for it in range(a.steps + 1):
                    sync(dev)
                    t = time.perf_counter()
                    forward_backward(model, batches, dev, bf16, aux)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(dev)
                    if it:
                        times.append(time.perf_counter() - t)
                med = sorted(times)[len(times) // 2]
                tok = 2 * a.mb * seq / med
                rows.append(dict(dropout=dropout, autocast=bf16, aux=aux, step_s=round(med, 4), tok_s=round(tok)))
                print(json.dumps(rows[-1]), flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])) as prof:
        forward_backward(model, batches, dev, True, 0.02)
        sync(dev)
    print(prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total", row_limit=30))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
