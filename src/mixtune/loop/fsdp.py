"""`train.distributed: fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) over the 4-bit base and the adapter.

    params = shard_model(model, dist, say)          # after LoRA; returns the (now sharded) trainable params
    with full_adapter(model, dist): ...             # rank 0's LoRA modules hold whole tensors (PEFT files)
    save_sharded(tmp_or_None, model, optimizer, dist)   # training state through torch.distributed.checkpoint
    load_sharded(path, model, optimizer)

Each decoder layer is one FSDP unit, then the root (embedding, final norm, lm_head). The NF4 storage that grows
with the weight (packed codes, absmax, absmax2: 1-D, `NF4Weight.as_parameters`) becomes frozen Parameters that
FSDP2 shards along dim 0 and all-gathers before the layer runs; the code tables stay replicated buffers. The
LoRA parameters, their gradients and the AdamW state are DTensor shards. A model larger than one GPU is loaded
with its decoder layers parked on the CPU, each keeping only this rank's chunk of its NF4 storage
(`load_model(..., offload_layers=True, shard_of=(rank, world))`); each comes back to the GPU just before it is
sharded, so a rank's device never holds more than its shards plus one whole layer. A layer is resharded after
its forward and all-gathered again before its backward, so the MoE kernels' autograd functions, which re-read
the NF4Weight's storage in backward, find it whole. The next layer's all-gather is issued while the current one
computes (`set_modules_to_forward_prefetch`).

Exact accumulation as under ddp: each rank's loss is already normalised by the whole step's label tokens, so
the reduce-scatter SUMS (gradient divide factor 1). The gradient norm is the global one (a DTensor reduced over
the shards), so clipping and the divergence guard decide the same on every rank.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..quant.nf4 import NF4Weight
from . import checkpoint as ckpt
from .checkpoint import SHARDED_DIR


def is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _sum_not_mean(module) -> None:
    """Reduce-scatter sums the gradients (torch >= 2.8: set_gradient_divide_factor; 2.5-2.7:
    set_reduce_scatter_divide_factor), as a plain SUM (a factor other than the world size would otherwise be
    PREMUL_SUM, which gloo lacks; dividing by 1 is skipped)."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)


FSDP_OPTIM_REFUSED = ("train.optim adamw_8bit with train.distributed fsdp on several ranks: bitsandbytes' 8-bit "
                      "AdamW cannot update FSDP's sharded (DTensor) parameters, nor could its quantized state be "
                      "checkpointed per shard; use train.optim adamw (fsdp already divides the fp32 AdamW state by "
                      "the number of ranks) or train.distributed ddp")


def check_optimizer(optim: str) -> None:
    """ValueError for an optimizer FSDP2 cannot drive (called before anything is built or written)."""
    if optim == "adamw_8bit":
        raise ValueError(FSDP_OPTIM_REFUSED)


def shard_model(model: nn.Module, dist, say=None) -> list:
    """Shard `model` (LoRA applied, on this rank's device) over dist's ranks with FSDP2; returns the trainable
    parameters (DTensors: build the optimizer over these). Marks dist.sharded. One process: nothing to shard."""
    if not dist.enabled:
        if say is not None:
            say("mixtune: train.distributed fsdp without torchrun: a single-process run; training as one")
        return [p for p in model.parameters() if p.requires_grad]
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    for m in model.modules():
        if isinstance(m, NF4Weight):
            m.as_parameters()
    device = model.model.embed_tokens.weight.device  # the root never leaves the compute device
    mesh = init_device_mesh(device.type, (dist.world,))
    layers = list(model.model.layers)
    for layer in layers:
        # a layer parked on the CPU while loading (offload_layers) comes back alone, its NF4 storage rebuilt at
        # full length around the chunk this rank kept (shard_of) ...
        kept = [(m, m.unpark_shard(device)) for m in layer.modules() if isinstance(m, NF4Weight)]
        layer.to(device)
        fully_shard(layer, mesh=mesh)  # ... and only this rank's shard stays: the whole copies are freed
        for m, chunks in kept:
            m.check_shard(chunks, local)
        _sum_not_mean(layer)
    fully_shard(model, mesh=mesh)
    _sum_not_mean(model)
    for a, b in zip(layers, layers[1:]):  # issue the next layer's all-gather while this one computes
        a.set_modules_to_forward_prefetch([b])
    dist.sharded = True
    if say is not None:
        say(f"mixtune: fsdp: {len(layers)} decoder layers + root sharded over {dist.world} ranks")
    return [p for p in model.parameters() if p.requires_grad]


def _reshard(model: nn.Module) -> None:
    """Every FSDP unit back to its sharded state (the root stays whole after a forward, e.g. an evaluation's),
    so parameters are DTensors before they are gathered or checkpointed."""
    for m in model.modules():
        if callable(getattr(m, "reshard", None)) and hasattr(m, "set_reshard_after_forward"):
            m.reshard()


def _lora_slots(model: nn.Module):
    """(module, name, parameter) of every trainable parameter, once per name it is registered under (a shared
    gate/up A, lora.shared_gate_up_a, is one parameter under two names)."""
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                yield mod, name, p


@contextlib.contextmanager
def full_adapter(model: nn.Module, dist, restore: bool = True):
    """Every rank all-gathers the adapter (one parameter at a time, onto the CPU); inside, rank 0's modules hold
    whole plain tensors (what save_adapter / peft_format read), the others' are unchanged. A no-op unless
    sharded. restore=False leaves the whole tensors in place (the end of training)."""
    if not getattr(dist, "sharded", False):
        yield
        return
    _reshard(model)
    swapped = []
    whole = {}  # id(parameter) -> its whole tensor on rank 0: a parameter under two names is gathered once
    for mod, name, p in list(_lora_slots(model)):
        if not is_dtensor(p):
            continue
        if id(p) not in whole:
            full = p.detach().full_tensor()  # a collective: every rank, in the same order
            whole[id(p)] = nn.Parameter(full.cpu()) if dist.is_main else None  # still trainable (report)
            del full
        if dist.is_main:
            swapped.append((mod, name, p))
            mod._parameters[name] = whole[id(p)]  # both names of a shared parameter: the same whole one
    try:
        yield
    finally:
        if restore:
            for mod, name, p in swapped:
                mod._parameters[name] = p


# --------------------------------------------------------------------------------------------------
# training state through torch.distributed.checkpoint
# --------------------------------------------------------------------------------------------------


def _state_dicts(model: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {k: v for k, v in msd.items() if k in trainable}, osd


def save_sharded(directory, model: nn.Module, optimizer, dist) -> None:
    """All ranks: write the adapter and optimizer shards into `directory`/sharded. Rank 0 passes the directory
    (its checkpoint's temporary), the other ranks None: they receive it."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    box = [directory]
    tdist.broadcast_object_list(box, src=0)
    _reshard(model)
    msd, osd = _state_dicts(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(box[0], SHARDED_DIR))


def load_sharded(path: str, model: nn.Module, optimizer) -> None:
    """All ranks: restore the adapter and optimizer shards of checkpoint `path` (same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    _reshard(model)
    msd, osd = _state_dicts(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def save_checkpoint(dist, out_dir: str, step: int, *, model: nn.Module, optimizer, save_adapter_fn, **kw) -> None:
    """Every rank: checkpoint `step` of an fsdp run. Rank 0 writes it atomically as `checkpoint.save_checkpoint`
    does (temporary, COMPLETE, rename); inside, all ranks write their shards and gather the adapter that rank 0
    writes in PEFT format."""
    def write(tmp):
        save_sharded(tmp, model, optimizer, dist)
        with full_adapter(model, dist):
            if tmp is not None and save_adapter_fn is not None:
                save_adapter_fn(os.path.join(tmp, "adapter"))

    if dist.is_main:
        ckpt.save_checkpoint(out_dir, step, model=model, optimizer=optimizer, sharded_fn=write, **kw)
    else:
        write(None)


def gather_adapter(model: nn.Module, dist) -> None:
    """Every rank: the end of training; rank 0's LoRA modules keep the whole adapter (for the final files)."""
    with full_adapter(model, dist, restore=False):
        pass
