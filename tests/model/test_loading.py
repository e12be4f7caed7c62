"""Checkpoint loading and writing: real layout, shards, NF4 on load, clear errors, the tiny default."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtune.model import (INDEX_FILE, MIXTRAL_8X7B_CONFIG, CheckpointError, MixtralConfig, build_model_on_meta,
                           checkpoint_files, expected_keys, iter_model_state, load_config_only, load_model,
                           parse_size, resolve_model_path, save_hf_checkpoint)
from mixtune.runtime import resolve_dtype
from mixtune.model.nf4 import NF4Linear, NF4Weight
from mixtune.model.tiny import make_tiny_checkpoint


def _state(model):
    return {k: v.clone() for k, v in iter_model_state(model)}


def _load(path, **kw):
    kw.setdefault("quant", "none")
    kw.setdefault("dtype", torch.float32)
    return load_model(path, report=None, **kw)


def test_tiny_checkpoint_is_the_real_layout(tiny_ckpt, tiny_config):
    files = checkpoint_files(tiny_ckpt)
    assert sorted(files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    keys = {k for ks in files.values() for k in ks}
    assert keys == set(expected_keys(tiny_config))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    index = json.load(open(os.path.join(tiny_ckpt, INDEX_FILE)))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in files for t in load_file(os.path.join(tiny_ckpt, f)).values())
    t = load_file(os.path.join(tiny_ckpt, index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w1.weight"]))
    assert t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape == (128, 64)
    assert t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype == torch.bfloat16
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(tiny_ckpt, f)), f
    assert MixtralConfig.from_pretrained(tiny_ckpt) == MixtralConfig.from_dict(tiny_config.to_hf_dict())


def test_sharded_and_single_file_load_identically(tiny_ckpt, tmp_path):
    single = str(tmp_path / "single")
    make_tiny_checkpoint(single, shards=1, tokenizer=False)  # same seed -> same weights, one file, no index
    assert sorted(f for f in os.listdir(single) if "safetensors" in f) == ["model.safetensors"]
    per_tensor = str(tmp_path / "per-tensor")  # every tensor its own shard: expert stacks span many files
    save_hf_checkpoint(iter_model_state(_load(tiny_ckpt)), per_tensor, _load(tiny_ckpt).config, max_shard_size=1,
                       dtype=torch.bfloat16)
    assert len(checkpoint_files(per_tensor)) == len(expected_keys(_load(tiny_ckpt).config))
    a, b, c = (_state(_load(p)) for p in (tiny_ckpt, single, per_tensor))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def test_loaded_weights_equal_the_file_and_are_frozen(tiny_ckpt):
    model = _load(tiny_ckpt, dtype=torch.bfloat16)
    raw = {}
    for f in checkpoint_files(tiny_ckpt):
        raw.update(load_file(os.path.join(tiny_ckpt, f)))
    ex = model.model.layers[1].block_sparse_moe.experts
    for e in range(4):
        assert torch.equal(ex.w2[e], raw[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"])
    assert ex.w1.shape == (4, 128, 64) and ex.w2.shape == (4, 64, 128)
    assert torch.equal(model.lm_head.weight, raw["lm_head.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_nf4_load_quantizes_attention_and_experts(tiny_ckpt):
    lines = []
    model = load_model(tiny_ckpt, quant="nf4", dtype=torch.bfloat16, report=lines.append)
    for layer in model.model.layers:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, n), NF4Linear)
        for n in ("w1", "w2", "w3"):
            assert isinstance(getattr(layer.block_sparse_moe.experts, n), NF4Weight)
        assert isinstance(layer.block_sparse_moe.gate.weight, torch.nn.Parameter)
        assert layer.block_sparse_moe.gate.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    text = "\n".join(lines)
    assert "nf4" in text and "14 tensors" in text and "KiB" in text and "s (compute dtype bfloat16)" in text
    # the stored NF4 values are the quantization of exactly the checkpoint's weights
    dense = _load(tiny_ckpt, dtype=torch.bfloat16)
    w = dense.model.layers[0].block_sparse_moe.experts.w3
    assert torch.equal(model.model.layers[0].block_sparse_moe.experts.w3.dequantize(), NF4Weight.quantize(w).dequantize())


def test_nf4_logits_close_to_bf16(tiny_ckpt):
    ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(5))
    q = load_model(tiny_ckpt, quant="nf4", dtype=torch.bfloat16, report=None)
    d = _load(tiny_ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        lq, ld = q(ids).logits.float(), d(ids).logits.float()
        # the NF4 model is exactly the bf16 model with its weights replaced by their dequantized values
        for (k, v) in iter_model_state(q):
            mod, _, p = k.rpartition(".")
            if "experts." in k:
                continue
            if isinstance(getattr(d.get_submodule(mod), p), torch.nn.Parameter):
                getattr(d.get_submodule(mod), p).copy_(v)
        for layer_q, layer_d in zip(q.model.layers, d.model.layers):
            for n in ("w1", "w2", "w3"):
                getattr(layer_d.block_sparse_moe.experts, n).copy_(getattr(layer_q.block_sparse_moe.experts, n).dequantize())
        l_deq = d(ids).logits.float()
    assert torch.allclose(lq, l_deq, atol=1e-2, rtol=0)
    rel = float((lq - ld).norm() / ld.norm())
    assert rel < 0.25, rel  # 4-bit weights: close, not equal
    assert float(torch.nn.functional.cosine_similarity(lq.flatten(), ld.flatten(), dim=0)) > 0.97


def _copy_single(tiny_ckpt, tmp_path, edit):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(os.path.join(tiny_ckpt, "config.json"), d)
    sd = {}
    for f in checkpoint_files(tiny_ckpt):
        sd.update(load_file(os.path.join(tiny_ckpt, f)))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def test_missing_key_is_named(tiny_ckpt, tmp_path):
    path = _copy_single(tiny_ckpt, tmp_path, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        _load(path)


def test_unexpected_key_is_named(tiny_ckpt, tmp_path):
    path = _copy_single(tiny_ckpt, tmp_path, lambda sd: sd.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.mlp\.gate_proj\.weight"):
        _load(path)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    path = _copy_single(tiny_ckpt, tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: shape \(65,\)"):
        _load(path)


def test_bad_directories(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="has no config.json"):
        _load(str(tmp_path))
    d = tmp_path / "cfg-only"
    d.mkdir()
    shutil.copy(os.path.join(tiny_ckpt, "config.json"), d)
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        _load(str(d))
    assert load_config_only(str(d)).num_local_experts == 4  # a config alone is enough for inspect
    shutil.copy(os.path.join(tiny_ckpt, INDEX_FILE), d)
    with pytest.raises(CheckpointError, match="names shard 'model-00001-of-00002.safetensors', which is missing"):
        _load(str(d))
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        _load(tiny_ckpt, quant="int3")


def test_hub_ids_go_through_snapshot_download(monkeypatch, tiny_ckpt):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return tiny_ckpt

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_path("someone/tiny-mixtral", cache_dir="/tmp/c", revision="abc") == tiny_ckpt
    repo, kw = calls[0]
    assert repo == "someone/tiny-mixtral" and kw["revision"] == "abc"
    # HF weights only: never a repo's duplicate consolidated.safetensors (Mistral format)
    assert set(kw["allow_patterns"]) == {"*.json", "model*.safetensors", "tokenizer.model"}
    assert kw["cache_dir"] == os.path.join("/tmp/c", "hub")  # model.cache_dir set: downloads go under it
    calls.clear()
    resolve_model_path("someone/tiny-mixtral")
    assert calls[0][1]["cache_dir"] is None  # else the standard Hugging Face cache, shared with other tools

    def offline(repo_id, **kw):
        raise OSError("Cannot reach https://huggingface.co\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as ei:
        resolve_model_path("mistralai/Mixtral-8x7B-v0.1")
    msg = str(ei.value)
    assert "\n" not in msg and "mistralai/Mixtral-8x7B-v0.1" in msg and "download failed" in msg


def test_tiny_default_is_built_once_and_reused(tiny_ckpt):
    path = resolve_model_path("")
    assert path == os.path.join(os.environ["MIXTUNE_CACHE"], "tiny-mixtral-v1")
    stamp = os.path.getmtime(os.path.join(path, "config.json"))
    assert resolve_model_path("") == path and os.path.getmtime(os.path.join(path, "config.json")) == stamp
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]
    a, b = _state(_load("")), _state(_load(tiny_ckpt))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_build_of_mixtral_8x7b_counts():
    model = build_model_on_meta(MIXTRAL_8X7B_CONFIG, quant="nf4")
    dense = sum(p.numel() for p in model.parameters())
    nf4 = sum(math.prod(m.shape) for m in model.modules() if isinstance(m, NF4Weight))
    assert dense + nf4 == 46_702_792_704  # Mixtral-8x7B's parameter count
    assert isinstance(model.model.layers[31].self_attn.v_proj, NF4Linear)
    assert model.model.layers[0].block_sparse_moe.experts.w2.shape == (8, 4096, 14336)
    plain = build_model_on_meta(MIXTRAL_8X7B_CONFIG, quant="none")
    assert sum(p.numel() for p in plain.parameters()) == 46_702_792_704


def test_dtype_and_size_parsing():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 * 2 ** 20 and parse_size(100) == 100


def test_saved_checkpoint_round_trips_and_loads_in_transformers(tiny_ckpt, tmp_path, hf_model_from):
    model = _load(tiny_ckpt)
    out = str(tmp_path / "out")
    files = save_hf_checkpoint(iter_model_state(model), out, model.config, max_shard_size="300KB",
                               dtype=torch.float32)
    assert INDEX_FILE in files and len(files) > 4
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    back = _load(out)
    assert all(torch.equal(v, back_v) for (_, v), (_, back_v) in zip(iter_model_state(model), iter_model_state(back)))
    ids = torch.randint(3, 32000, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(hf_model_from(out)(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="given twice"):
        save_hf_checkpoint([("a", torch.zeros(2)), ("a", torch.zeros(2))], str(tmp_path / "dup"), model.config)


def test_streaming_keeps_one_layer_of_experts_open(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt, quant="nf4", dtype=torch.bfloat16, report=None)
    info = model.load_info
    assert info["max_open_expert_stacks"] <= 3  # w1, w2, w3 of one layer at most, even across the shard split
    assert info["nf4_tensors"] == 2 * 4 + 2 * 3
    assert info["nf4_bytes"] < info["nf4_bytes_as_16bit"] / 3
    assert info["weight_bytes"] == info["nf4_bytes"] + info["dense_bytes"]


def test_tied_embeddings(tmp_path, tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, tie_word_embeddings=True, vocab_size=512)
    path = make_tiny_checkpoint(str(tmp_path / "tied"), cfg, shards=1, tokenizer=False)
    assert "lm_head.weight" not in checkpoint_files(path)["model.safetensors"]
    model = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 512, (1, 6))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 6, 512)


def test_damaged_weights_and_config_are_named(tmp_path, tiny_ckpt):
    d = tmp_path / "damaged"
    shutil.copytree(tiny_ckpt, d)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])  # a truncated download
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not a readable safetensors file"):
        _load(str(d))
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(os.path.join(tiny_ckpt, "config.json"), single)
    (single / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        _load(str(single))
    (single / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config_only(str(single))


def _spy_parking(monkeypatch):
    """Records (layer index, whether any LATER layer already had a tensor) each time a layer is parked."""
    from mixtune.model.loading import LayerParking
    seen, park = [], LayerParking._park

    def spy(self, idx, layer):
        later = list(self.model.model.layers)[idx + 1:]
        started = any(not t.is_meta for lay in later for t in list(lay.parameters()) + list(lay.buffers()))
        seen.append((idx, started))
        park(self, idx, layer)
    monkeypatch.setattr(LayerParking, "_park", spy)
    return seen


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_offload_layers_parks_each_layer_once_and_loads_the_same_model(tiny_ckpt, monkeypatch, quant):
    """fsdp loading: every decoder layer is parked on the CPU exactly once, when its last tensor is in place, and
    the model is the one a plain load gives (what each rank then shards layer by layer)."""
    seen = _spy_parking(monkeypatch)
    parked = _load(tiny_ckpt, quant=quant, dtype=torch.bfloat16, offload_layers=True)
    plain = _load(tiny_ckpt, quant=quant, dtype=torch.bfloat16)
    assert sorted(i for i, _ in seen) == list(range(len(plain.model.layers)))
    a, b = _state(parked), _state(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.device.type == "cpu" for lay in parked.model.layers for t in lay.parameters())


def test_random_build_parks_layer_l_before_building_layer_l_plus_1(monkeypatch):
    """The random full-size builder (the Mixtral-8x22B benchmark under fsdp) parks layer l before any tensor of
    layer l+1 exists on the device: the device holds one layer at a time; the weights are the unparked build's."""
    from mixtune.model.random_init import build_random_nf4_model
    seen = _spy_parking(monkeypatch)
    cfg = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    parked = build_random_nf4_model(cfg, device="cpu", seed=3, offload_layers=True)
    assert seen == [(0, False), (1, False), (2, False)]
    plain = build_random_nf4_model(cfg, device="cpu", seed=3)
    a, b = _state(parked), _state(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_of_keeps_this_ranks_chunk_of_the_nf4_storage(tiny_ckpt):
    """fsdp loading with shard_of=(rank, world): a parked layer's NF4 storage holds only torch.chunk's chunk
    `rank` (what fully_shard keeps), the rest of the model is whole; unpark_shard puts the chunk back at its
    offset in a full-length tensor; check_shard refuses a local shard that is not that chunk."""
    from mixtune.model.loading import load_model
    plain = load_model(tiny_ckpt, quant="nf4", dtype=torch.bfloat16, report=None)
    for m in plain.modules():
        if isinstance(m, NF4Weight):
            m.as_parameters()
    world = 3
    for rank in range(world):
        parked = load_model(tiny_ckpt, quant="nf4", dtype=torch.bfloat16, report=None, offload_layers=True,
                            shard_of=(rank, world))
        pairs = [(a, b) for a, b in zip(parked.modules(), plain.modules()) if isinstance(a, NF4Weight)]
        assert len(pairs) == 2 * 4 + 2 * 3  # per layer q/k/v/o and the three expert stacks
        for a, b in pairs:
            assert a.shape == b.shape and a.parked_shard
            for name, (n, lo) in a.parked_shard.items():
                full = b._parameters[name].detach()
                want = torch.chunk(full, world)[rank] if rank < len(torch.chunk(full, world)) else full[:0]
                got = a._parameters[name].detach()
                assert n == full.shape[0] and torch.equal(got.view(torch.int16), want.view(torch.int16))
            kept = a.unpark_shard("cpu")
            for name, chunk in kept.items():
                full = a._parameters[name].detach()
                assert full.shape == b._parameters[name].shape
                lo = min(full.shape[0], rank * -(-full.shape[0] // world))
                assert torch.equal(full[lo:lo + chunk.shape[0]].view(torch.int16), chunk.view(torch.int16))
            def local(p, shift=0, a=a, b=b, kept=kept):  # what fully_shard would leave: the chunk (shifted)
                name = next(k for k in kept if a._parameters[k] is p)
                full, n = b._parameters[name].detach(), kept[name].shape[0]
                lo = min(full.shape[0], rank * -(-full.shape[0] // world)) + shift
                return full[lo:lo + n]
            a.check_shard(kept, local)
            if kept and rank == 1:  # a chunk one element off (same shape), or a whole tensor: refused
                for wrong in (lambda p: local(p, shift=-1), lambda p: p.detach()):
                    with pytest.raises(RuntimeError, match="not the dim-0 chunk"):
                        a.check_shard(kept, wrong)
    # unsharded parts are whole: the embedding and the adapter-free norms
    assert parked.model.embed_tokens.weight.shape == plain.model.embed_tokens.weight.shape
