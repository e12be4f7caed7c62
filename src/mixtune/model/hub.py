"""Locate a model: the embedded tiny default (built once, cached), a local directory, or a Hub id (downloaded).

    path = resolve_model_path("")                      # the tiny default under $MIXTUNE_CACHE or ~/.cache/mixtune
    path = resolve_model_path("mistralai/Mixtral-8x7B-v0.1")   # snapshot_download of config, weights, tokenizer
    config = load_config_only("mistralai/Mixtral-8x7B-v0.1")   # config.json only, no weights
"""

from __future__ import annotations

import os
from typing import Optional

from .._fs import publish_mode
from .config import MoEConfig
from .family import family_of
from .safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files

TINY_NAME = "tiny-mixtral-v1"


def default_cache_dir(cache_dir: str = "") -> str:
    """cache_dir, else $MIXTUNE_CACHE, else ~/.cache/mixtune."""
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get("MIXTUNE_CACHE")
                                              or os.path.join("~", ".cache", "mixtune")))


def _looks_local(name: str) -> bool:
    """A Hub id is exactly "owner/name"; anything else (absolute, relative, ~) is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def check_model_dir(path: str, need_weights: bool = True) -> None:
    """Raise CheckpointError unless `path` is a directory with config.json (and safetensors weights)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"model directory {path!r} has no config.json")
    if need_weights and not checkpoint_files(path, check=False):
        raise CheckpointError(f"model directory {path!r} has no safetensors weights "
                              f"({SINGLE_FILE} or {INDEX_FILE} + shards)")


def tiny_name(family: str = "mixtral") -> str:
    """The cache directory name of a family's tiny random default."""
    family_of(family or "mixtral")
    return TINY_NAME if family in ("", "mixtral") else f"tiny-{family}-v1"


def resolve_model_path(name_or_path: str, cache_dir: str = "", revision: Optional[str] = None,
                       need_weights: bool = True, family: str = "mixtral") -> str:
    """A local directory holding config.json + safetensors for `name_or_path`.

    "" = the embedded tiny random model of `family` (Mixtral by default), built once into <cache>/tiny-*-v1; an
    existing directory is used as is; "owner/name" is downloaded from the Hugging Face Hub (*.json,
    model*.safetensors, tokenizer.model)."""
    if not name_or_path:
        root = default_cache_dir(cache_dir)
        path = os.path.join(root, tiny_name(family))
        if not os.path.isfile(os.path.join(path, "config.json")):
            _build_tiny_atomically(path, family or "mixtral")
        return path
    local = os.path.abspath(os.path.expanduser(name_or_path))
    if os.path.exists(local) or _looks_local(name_or_path):
        check_model_dir(local, need_weights)
        return local
    return _download(name_or_path, cache_dir, revision, need_weights)


def _build_tiny_atomically(path: str, family: str = "mixtral") -> None:
    import shutil
    import tempfile

    from .config import TINY_FAMILY_CONFIGS
    from .tiny import make_tiny_checkpoint

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        make_tiny_checkpoint(tmp, TINY_FAMILY_CONFIGS[family])
        publish_mode(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: use theirs
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _download(repo_id: str, cache_dir: str, revision: Optional[str], need_weights: bool) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id!r} is not a local directory and huggingface_hub is missing: {e}")
    patterns = ["*.json", "model*.safetensors", "tokenizer.model"] if need_weights else ["*.json", "tokenizer.model"]
    try:
        # model.cache_dir set: download under it; else the standard Hugging Face cache (HF_HOME), so a
        # Mixtral already downloaded by other tools is reused instead of fetched again (93 GB)
        hub_cache = os.path.join(default_cache_dir(cache_dir), "hub") if cache_dir else None
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=hub_cache)
    except Exception as e:  # network, auth, missing repo: one line for the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"model {repo_id!r}: not a local directory, and the Hugging Face Hub download "
                              f"failed ({type(e).__name__}: {first})") from None
    check_model_dir(path, need_weights)
    return path

def load_config_only(name_or_path: str, cache_dir: str = "", revision: Optional[str] = None,
                     family: str = "mixtral") -> MoEConfig:
    """The MoEConfig of a model (a directory, a config.json file, or a Hub id); weights not needed. An
    unsupported model_type or a malformed config.json is a CheckpointError naming the file."""
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        path = name_or_path
    else:
        path = resolve_model_path(name_or_path, cache_dir, revision, need_weights=False, family=family)
    try:
        return MoEConfig.from_pretrained(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
