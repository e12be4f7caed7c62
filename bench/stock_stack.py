"""The stock stack timed side by side with mixtune: transformers' MixtralForCausalLM or, for a Qwen3-MoE
geometry (`mixtune bench --geometry qwen3-30b-a3b`, cfg.model_type "qwen3_moe"), Qwen3MoeForCausalLM (fused
grouped_mm experts in both) + bitsandbytes 4-bit + peft LoRA (r=64 on q/k/v/o and, through `target_parameters`,
on the experts: mlp.experts.gate_up_proj / down_proj, the same names in both families).

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

FAMILIES = ("mixtral", "qwen3_moe")


def _sync(device="cuda"):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_model(cfg, layers):
    """(transformers config, model class) of cfg's family (a mixtune MoEConfig) cut to `layers` layers. mixtune's
    field names: num_local_experts = expert count, intermediate_size = one expert's width (Qwen's
    moe_intermediate_size), dense_intermediate_size = Qwen's intermediate_size (dense layers)."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  num_experts_per_tok=cfg.num_experts_per_tok, rope_theta=cfg.rope_theta,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)
    if cfg.model_type == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        hc = Qwen3MoeConfig(**common, head_dim=cfg.head_dim, num_experts=cfg.num_local_experts,
                            moe_intermediate_size=cfg.intermediate_size,
                            intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size,
                            norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                            mlp_only_layers=list(cfg.mlp_only_layers), attention_bias=cfg.attention_bias,
                            use_sliding_window=False)
        return hc, Qwen3MoeForCausalLM
    if cfg.model_type != "mixtral":
        raise ValueError(f"the stock stack runs {', '.join(FAMILIES)}; this geometry is {cfg.model_type}")
    from transformers import MixtralConfig, MixtralForCausalLM
    hc = MixtralConfig(**common, intermediate_size=cfg.intermediate_size, num_local_experts=cfg.num_local_experts)
    return hc, MixtralForCausalLM


def expected_trainable(cfg, layers, r=64):
    """LoRA parameters peft puts on q/k/v/o + the fused experts (target_parameters: rank r per expert) of `layers`
    layers, or 0 when a layer in range is dense (not modelled). Qwen3-30B-A3B at 4 layers: 214,171,648."""
    if not all(cfg.is_moe_layer(li) for li in range(layers)) or cfg.shared_expert_intermediate_size:
        return 0
    H, d, E, I = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = r * (H + q) + 2 * r * (H + kv) + r * (q + H)
    experts = r * E * (H + 2 * I) + r * E * (I + H)
    return layers * (attn + experts)


def run_stock(Row, cfg, layers, s, seq, device, steps, warmup, seed=0):
    from mixtune.bench import packed_batch
    row = Row("stock tf+bnb+peft", layers, s["mb"], seq, s.get("accum", 1),
              f"grouped_mm, ckpt={'layer' if s['ckpt'] else 'none'}")
    model = opt = None
    cuda = torch.device(device).type == "cuda"
    try:
        import bitsandbytes as bnb
        import peft
        import transformers
        t0 = time.perf_counter()
        hc, model_cls = hf_model(cfg, layers)
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls._from_config(hc, dtype=torch.bfloat16)
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
        if cuda:
            torch.cuda.empty_cache()
        if s["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = peft.get_peft_model(model, lcfg)
        model.train()
        _sync(device)
        row.build_s = time.perf_counter() - t0
        row.setting += f", {hc.model_type}, peft {peft.__version__}, tf {transformers.__version__}"
        params = [p for p in model.parameters() if p.requires_grad]
        row.trainable = sum(p.numel() for p in params)
        want = expected_trainable(cfg, layers, lcfg.r)
        if want and row.trainable != want:  # e.g. a peft that silently skips the fused experts
            raise RuntimeError(f"LoRA has {row.trainable:,} trainable parameters, expected {want:,} "
                               "(q/k/v/o + experts)")
        opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        batches = [packed_batch(row.micro_batch, seq, cfg.vocab_size, device, seed + i) for i in range(row.accum)]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], float("nan")
        for it in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            for ids, lab, pos in batches:
                out = model(input_ids=ids, position_ids=pos, labels=lab)
                (out.loss / row.accum).backward()
                loss_t = out.loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if it >= warmup:
                times.append(time.perf_counter() - t0)
            loss = float(loss_t)
        row.fill(cfg, row.micro_batch * seq * row.accum, times, torch.cuda.max_memory_allocated() if cuda else 0,
                 loss)
    except torch.OutOfMemoryError as e:
        row.error = "OOM: " + str(e).split("\n")[0][:80]
    except Exception as e:  # report and go on: the comparison must not hide mixtune's rows
        row.error = f"{type(e).__name__}: {str(e)[:160]}"
    finally:
        del model, opt
    return row
