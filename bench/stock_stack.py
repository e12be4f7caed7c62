"""The stock stack timed side by side with mixtune: transformers' MixtralForCausalLM (fused grouped_mm
experts) + bitsandbytes 4-bit + peft LoRA (r=64 on q/k/v/o and, through `target_parameters`, on the experts).

Random weights of the same geometry, built in bf16 on the GPU; the attention projections are then replaced by
`bitsandbytes.nn.Linear4bit` (NF4, double quantization, bf16 compute): the modules that
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` installs, without the
11 GB save/load round trip. As in that path, the fused experts, router and lm_head stay bf16 (bitsandbytes
quantizes only nn.Linear), and we do not call `prepare_model_for_kbit_training` (it would upcast the experts
to fp32). Packed rows are passed as position_ids with no attention mask and use_cache=False, so transformers
(masking_utils.find_packed_sequence_indices) builds the same per-example causal mask that mixtune uses.
"""

from __future__ import annotations

import time

import torch


def _sync():
    torch.cuda.synchronize()


def run_stock(Row, cfg, layers, s, seq, device, steps, warmup, seed=0):
    from mixtune.bench import packed_batch
    row = Row("stock tf+bnb+peft", layers, s["mb"], seq, s.get("accum", 1),
              f"grouped_mm, ckpt={'layer' if s['ckpt'] else 'none'}")
    model = opt = None
    try:
        import bitsandbytes as bnb
        import peft
        import transformers
        from transformers import MixtralConfig as HFConfig, MixtralForCausalLM as HFMixtral
        t0 = time.perf_counter()
        hc = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_hidden_layers=layers,
                      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                      num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                      rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
                      use_cache=False)
        torch.manual_seed(seed)
        with torch.device(device):
            model = HFMixtral._from_config(hc, dtype=torch.bfloat16)
        for layer in model.model.layers:
            att = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(att, name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64).to(device)
                setattr(att, name, q)
                del lin
        torch.cuda.empty_cache()
        if s["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = peft.get_peft_model(model, lcfg)
        model.train()
        _sync()
        row.build_s = time.perf_counter() - t0
        row.setting += f", peft {peft.__version__}, tf {transformers.__version__}"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        batches = [packed_batch(row.micro_batch, seq, cfg.vocab_size, device, seed + i) for i in range(row.accum)]
        torch.cuda.reset_peak_memory_stats()
        times, loss = [], float("nan")
        for it in range(warmup + steps):
            _sync()
            t0 = time.perf_counter()
            for ids, lab, pos in batches:
                out = model(input_ids=ids, position_ids=pos, labels=lab)
                (out.loss / row.accum).backward()
                loss_t = out.loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            if it >= warmup:
                times.append(time.perf_counter() - t0)
            loss = float(loss_t)
        row.fill(cfg, row.micro_batch * seq * row.accum, times, torch.cuda.max_memory_allocated(), loss)
    except torch.OutOfMemoryError as e:
        row.error = "OOM: " + str(e).split("\n")[0][:80]
    except Exception as e:  # report and go on: the comparison must not hide mixtune's rows
        row.error = f"{type(e).__name__}: {str(e)[:160]}"
    finally:
        del model, opt
    return row
