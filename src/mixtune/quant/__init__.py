"""Quantized weight storage (a foundation: used by the kernels, the model, LoRA, merge and inspect alike).

    from mixtune.quant.nf4 import NF4Weight     # 4-bit NormalFloat, bitsandbytes' layout
"""
