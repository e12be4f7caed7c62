"""Pushing a run to the Hugging Face Hub (`train.push_to_hub: REPO`, `train.push_merged`) with huggingface_hub.

    check_credentials(cfg)                     # before anything is written: no token -> ConfigError (exit 2)
    push_run(cfg, adapter_dir, merged_dir, result, base_model)   # repo, model card, adapter (+ merged/)

The adapter goes to the repo's root (PEFT loads it from there), the merged model (when asked) under `merged/`,
and a model card (README.md) names the base model, the data, the config and the final eval loss.
"""

from __future__ import annotations

import io
import os
from typing import Optional

from ..config import ConfigError


def hub_token() -> Optional[str]:
    """The token huggingface_hub would use: HF_TOKEN, else the one `hf auth login` stored."""
    from huggingface_hub import get_token

    return get_token()


def check_credentials(cfg) -> None:
    """train.push_to_hub needs a Hub token: without one, say so in one line before the run starts."""
    if cfg.train.push_to_hub and not hub_token():
        raise ConfigError(f"train.push_to_hub {cfg.train.push_to_hub}: no Hugging Face token: set HF_TOKEN or run "
                          f"`hf auth login` (huggingface_hub), then start again")
    if cfg.train.push_merged and not cfg.train.push_to_hub:
        raise ConfigError("train.push_merged: needs train.push_to_hub REPO (where to push the merged model)")


def _data_line(cfg) -> str:
    d = cfg.data
    if getattr(d, "datasets", None):
        parts = [str(s.get("source") or s.get("path")) for s in d.datasets if isinstance(s, dict)]
        return "a mixture of " + ", ".join(parts) + f" (template {d.template})"
    where = d.path or d.source
    return f"{where} (template {d.template})"


def model_card(cfg, base_model: str, result: dict, merged: bool) -> str:
    """README.md for the Hub repo: metadata for the Hub (base_model, library_name peft) and a short account."""
    loss = result.get("eval_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, float) else "n/a (no eval data)"
    config_yaml = cfg.to_yaml() if hasattr(cfg, "to_yaml") else _yaml(cfg)
    lines = ["---", f"base_model: {base_model}", "library_name: peft", "tags:", "- mixtune", "- lora", "- qlora",
             "- moe", "---", "", f"# {cfg.train.push_to_hub}", "",
             f"A LoRA adapter for `{base_model}`, trained with mixtune (QLoRA on a Mixture-of-Experts model).", "",
             f"- **Base model:** `{base_model}`", f"- **Data:** {_data_line(cfg)}",
             f"- **Final eval loss:** {loss_text}", f"- **Steps:** {result.get('steps')}",
             f"- **LoRA:** r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, targets {', '.join(cfg.lora.targets)}"]
    if merged:
        lines.append("- **Merged model:** under `merged/` (the adapter folded into the 16-bit base weights)")
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def _yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def push_run(cfg, adapter_dir: str, merged_dir: Optional[str], result: dict, base_model: str,
             say=print) -> str:
    """Create the repo (if needed), upload the model card and the adapter, and the merged model when
    train.push_merged. Returns the repo's URL."""
    from huggingface_hub import HfApi

    repo = cfg.train.push_to_hub
    api = HfApi(token=hub_token())
    url = api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    merged = bool(cfg.train.push_merged and merged_dir and os.path.isdir(merged_dir))
    api.upload_folder(repo_id=repo, folder_path=adapter_dir, repo_type="model",
                      commit_message="mixtune: adapter")
    if merged:
        api.upload_folder(repo_id=repo, folder_path=merged_dir, path_in_repo="merged", repo_type="model",
                          commit_message="mixtune: merged model")
    card = model_card(cfg, base_model, result, merged)
    api.upload_file(path_or_fileobj=io.BytesIO(card.encode()), path_in_repo="README.md", repo_id=repo,
                    repo_type="model", commit_message="mixtune: model card")
    say(f"mixtune: pushed the adapter{' and the merged model' if merged else ''} to {url}")
    return str(url)
