"""NF4 weight storage (4-bit NormalFloat, double-quantized), laid out exactly as bitsandbytes stores it.

Quantization goes through `bitsandbytes.functional.quantize_4bit` (blocks of 64 weights, the absmax of each
block itself quantized to uint8 in blocks of 256 with an fp32 scale and a mean offset). Dequantization here is
pure PyTorch and equals `bitsandbytes.functional.dequantize_4bit` bit for bit (tested); fast GPU paths read the
same buffers (see `mixtune.kernels`). The module that computes with it, `NF4Linear`, lives in
`mixtune.model.nf4`.

    w4 = NF4Weight.quantize(w)           # w: (..., out, in) float
    w4.dequantize(torch.bfloat16)        # (..., out, in)
    w4.nbytes                            # storage bytes (packed + absmax + nested stats)

For a 3-D expert stack (E, out, in) whose per-expert size is a multiple of 64*256, `dequantize_expert(e)`
reads only that expert's blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BLOCK = 64  # weights per absmax
BLOCK2 = 256  # absmax values per fp32 scale (double quantization)

# The 16 NF4 levels (bitsandbytes' table; also `quant_state.code`).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171066284, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def _bnb():
    import warnings
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F
    return F


class NF4Weight(nn.Module):
    """A frozen weight stored in NF4. Buffers (all move with `.to()`):
    packed  (numel/2,) uint8   two 4-bit codes per byte, first element in the high nibble
    absmax  (numel/64,) uint8  block absmax, quantized with `code2` against `absmax2`
    absmax2 (ceil(numel/64/256),) float32
    code2   (256,) float32     bitsandbytes' dynamic map for the nested quantization
    offset  () float32         mean removed from the absmax before nested quantization
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.shape = torch.Size(shape)
        self.orig_dtype = dtype
        n = math.prod(shape)
        if n % BLOCK:
            raise ValueError(f"NF4 needs a multiple of {BLOCK} weights, got shape {tuple(shape)}")
        nb = n // BLOCK
        self.register_buffer("packed", torch.zeros(n // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8))
        self.register_buffer("absmax2", torch.zeros(math.ceil(nb / BLOCK2), dtype=torch.float32))
        self.register_buffer("code2", torch.zeros(256, dtype=torch.float32))
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        self.register_buffer("code", NF4_CODE.clone())

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor) -> "NF4Weight":
        """Quantize `w` (any shape whose numel is a multiple of 64) on w's device."""
        F = _bnb()
        src = w.detach().contiguous()
        if src.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            src = src.float()
        q, st = F.quantize_4bit(src, blocksize=BLOCK, compress_statistics=True, quant_type="nf4",
                                quant_storage=torch.uint8)
        self = cls(tuple(w.shape), w.dtype if w.dtype.is_floating_point else torch.float32)
        self.packed = q.reshape(-1)
        self.absmax = st.absmax.reshape(-1)
        self.absmax2 = st.state2.absmax.reshape(-1).float()
        self.code2 = st.state2.code.float()
        self.offset = torch.as_tensor(st.offset, dtype=torch.float32, device=w.device).reshape(())
        self.code = st.code.float().to(w.device)
        return self

    def bnb_quant_state(self):
        """The equivalent bitsandbytes QuantState (for tests and for bitsandbytes' own kernels)."""
        F = _bnb()
        state2 = F.QuantState(absmax=self.absmax2, code=self.code2, blocksize=BLOCK2, dtype=torch.float32)
        return F.QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=BLOCK,
                            quant_type="nf4", dtype=self.orig_dtype, offset=self.offset, state2=state2)

    SHARDABLE = ("packed", "absmax", "absmax2")  # 1-D, grow with the weight; code2/offset/code stay buffers

    def as_parameters(self) -> "NF4Weight":
        """Re-register the storage that grows with the weight (packed codes, absmax, absmax2) as frozen
        Parameters, so FSDP2 shards and all-gathers it along dim 0 like any parameter (done just before
        `fully_shard`; the small code tables stay replicated buffers). Counting code skips these parameters
        (`nf4_storage_ids`): an NF4Weight counts once, by its logical shape."""
        for name in self.SHARDABLE:
            if name in self._parameters:  # done already (idempotent: packed/absmax read back as uint8 views)
                continue
            t = getattr(self, name)
            if t.dtype == torch.uint8:
                if t.numel() % 2:  # cannot be viewed as 16-bit: stays a (replicated) buffer
                    continue
                # torch 2.11's fully_shard builds every sharded parameter with requires_grad=True first, which
                # only floating dtypes allow: hold the bytes as float16 (a bitwise view; `__getattr__` views
                # them back as uint8 for every reader; all-gathers copy bits, so nothing is converted)
                t = t.view(torch.float16)
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        return self

    def park_shard(self, rank: int, world: int) -> None:
        """Keep only this rank's dim-0 chunk of each shardable storage tensor (made Parameters first): chunk
        `rank` of `torch.chunk(t, world)`, which is all FSDP2's `fully_shard` keeps of it on this rank. A parked
        model's storage is not readable until `unpark_shard` (loading for fsdp: the host holds 1/world of the
        4-bit model per rank instead of all of it)."""
        self.as_parameters()
        parked = {}
        for name in self.SHARDABLE:
            p = self._parameters.get(name)
            if p is None:  # stayed a replicated buffer
                continue
            n = p.shape[0]
            c = -(-n // world)  # torch.chunk's chunk length
            lo = min(n, rank * c)
            parked[name] = (n, lo)
            p.data = p.data[lo:min(n, lo + c)].clone()
        self.parked_shard = parked

    def unpark_shard(self, device) -> dict:
        """Full-length storage on `device` with this rank's chunk in place; the other ranks' ranges are left
        uninitialised (fully_shard never reads them). Returns {name: the chunk} for `check_shard`."""
        kept = {}
        for name, (n, lo) in getattr(self, "parked_shard", {}).items():
            p = self._parameters[name]
            full = torch.empty((n,) + tuple(p.shape[1:]), dtype=p.dtype, device=device)
            full[lo:lo + p.shape[0]] = p.data.to(device)
            kept[name] = p.data
            p.data = full
        self.parked_shard = {}
        return kept

    def check_shard(self, kept: dict, local) -> None:
        """After sharding: this rank's local shard must be the chunk it kept (first and last elements), else
        the sharding layout is not torch.chunk's and the model would be silently wrong: RuntimeError."""
        for name, chunk in kept.items():
            got = local(self._parameters[name])
            if got.dtype == chunk.dtype and got.dtype.is_floating_point:  # compare bits (bytes held as fp16 have NaNs)
                got, chunk = got.contiguous().view(torch.uint8), chunk.contiguous().view(torch.uint8)
            k = min(64, chunk.shape[0])
            ok = got.shape == chunk.shape and (k == 0 or (torch.equal(got[:k].cpu(), chunk[:k])
                                                          and torch.equal(got[-k:].cpu(), chunk[-k:])))
            if not ok:
                raise RuntimeError(f"fsdp: the local shard of NF4 storage {name!r} ({tuple(got.shape)}) is not the "
                                   f"dim-0 chunk this rank kept while loading ({tuple(chunk.shape)}): FSDP's sharding "
                                   "layout is not torch.chunk's")

    def __getattr__(self, name: str):
        t = super().__getattr__(name)
        if name in ("packed", "absmax") and isinstance(t, torch.Tensor) and t.dtype == torch.float16:
            return t.view(torch.uint8)  # the bytes as_parameters() stored as float16
        return t

    # ------------------------------------------------------------------ reading
    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.packed, self.absmax, self.absmax2, self.code2))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def real_absmax(self) -> torch.Tensor:
        """(numel/64,) float32 block scales."""
        nb = self.absmax.numel()
        scale = self.absmax2.repeat_interleave(BLOCK2)[:nb]
        return self.code2[self.absmax.long()] * scale + self.offset

    def _dequant_range(self, start_block: int, n_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        b = self.packed[start_block * BLOCK // 2:(start_block + n_blocks) * BLOCK // 2]
        idx = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1).long()  # (n_blocks*64,)
        nb_total = self.absmax.numel()
        am = self.real_absmax() if n_blocks == nb_total else self._absmax_range(start_block, n_blocks)
        vals = self.code[idx].view(n_blocks, BLOCK) * am.view(n_blocks, 1)
        return vals.to(dtype)

    def _absmax_range(self, start_block: int, n_blocks: int) -> torch.Tensor:
        a = self.absmax[start_block:start_block + n_blocks].long()
        g = torch.arange(start_block, start_block + n_blocks, device=a.device) // BLOCK2
        return self.code2[a] * self.absmax2[g] + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight, shape `self.shape`, in `dtype` (default: the dtype it was quantized from)."""
        dtype = dtype or self.orig_dtype
        return self._dequant_range(0, self.absmax.numel(), dtype).view(self.shape)

    def dequantize_expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's (out, in) slice of a 3-D stack, reading only its blocks."""
        dtype = dtype or self.orig_dtype
        per = math.prod(self.shape[1:])
        if per % BLOCK:
            return self.dequantize(dtype)[e]
        nbe = per // BLOCK
        return self._dequant_range(e * nbe, nbe, dtype).view(self.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nf4, {self.nbytes / 2**20:.2f} MiB"


def nf4_storage_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that are NF4 storage (after `NF4Weight.as_parameters`): counted by the module's
    logical shape, never as parameters of their own."""
    return {id(p) for m in model.modules() if isinstance(m, NF4Weight) for p in m.parameters(recurse=False)}


def dequantize_any(w, dtype: torch.dtype) -> torch.Tensor:
    """A plain tensor for either storage."""
    if isinstance(w, NF4Weight):
        return w.dequantize(dtype)
    return w.to(dtype)
