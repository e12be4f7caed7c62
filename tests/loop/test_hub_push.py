"""train.push_to_hub: the adapter (and the merged model with train.push_merged) and a model card go to the Hub
through huggingface_hub's HfApi, whose calls are intercepted here: nothing is sent anywhere. No token: one line,
exit 2, nothing written."""

import os

import pytest
from huggingface_hub import HfApi

from mixtune.config import load_config


@pytest.fixture
def hub(monkeypatch):
    """Record HfApi calls instead of making them."""
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")

    def rec(name, ret=None):
        def f(self, *a, **kw):
            assert self.token == "hf_test_token_not_real"
            if "path_or_fileobj" in kw and hasattr(kw["path_or_fileobj"], "read"):
                kw["path_or_fileobj"] = kw["path_or_fileobj"].read().decode()
            if "folder_path" in kw:
                kw["files"] = sorted(os.listdir(kw["folder_path"]))
            calls.append((name, kw))
            return ret
        return f

    monkeypatch.setattr(HfApi, "create_repo", rec("create_repo", "https://huggingface.co/me/tiny-lora"))
    monkeypatch.setattr(HfApi, "upload_folder", rec("upload_folder"))
    monkeypatch.setattr(HfApi, "upload_file", rec("upload_file"))
    return calls


def test_push_run_uploads_adapter_merged_and_a_model_card(hub, tmp_path):
    from mixtune.loop.hub_push import push_run

    for d, f in (("adapter", "adapter_config.json"), ("merged", "config.json")):
        os.makedirs(tmp_path / d)
        (tmp_path / d / f).write_text("{}")
    cfg = load_config(None, ["--train.push_to_hub", "me/tiny-lora", "--train.push_merged", "true",
                             "--data.path", "train.jsonl", "--lora.r", "8"])
    said = []
    url = push_run(cfg, str(tmp_path / "adapter"), str(tmp_path / "merged"), {"eval_loss": 1.23456, "steps": 3},
                   "mistralai/Mixtral-8x7B-v0.1", said.append)
    assert url == "https://huggingface.co/me/tiny-lora" and "pushed the adapter and the merged model" in said[0]
    names = [c[0] for c in hub]
    assert names == ["create_repo", "upload_folder", "upload_folder", "upload_file"]
    assert hub[0][1]["repo_id"] == "me/tiny-lora" and hub[0][1]["exist_ok"]
    adapter, merged, card = hub[1][1], hub[2][1], hub[3][1]
    assert adapter["files"] == ["adapter_config.json"] and adapter.get("path_in_repo") in (None, "")
    assert merged["files"] == ["config.json"] and merged["path_in_repo"] == "merged"
    assert card["path_in_repo"] == "README.md" and card["repo_id"] == "me/tiny-lora"
    text = card["path_or_fileobj"]
    assert text.startswith("---\nbase_model: mistralai/Mixtral-8x7B-v0.1\nlibrary_name: peft\n")
    assert "**Final eval loss:** 1.2346" in text and "train.jsonl" in text and "under `merged/`" in text
    assert "```yaml\nmodel:" in text and "  r: 8\n" in text and "push_to_hub: me/tiny-lora" in text


def test_train_pushes_at_the_end(hub, tmp_path):
    from mixtune import train

    out = str(tmp_path / "run")
    cfg = load_config(None, ["--train.output_dir", out, "--train.max_steps", "1", "--train.generate_after", "0",
                             "--train.push_to_hub", "me/tiny-lora", "--train.progress", "false"])
    result = train.main(cfg)
    assert result["hub"] == "https://huggingface.co/me/tiny-lora"
    assert [c[0] for c in hub] == ["create_repo", "upload_folder", "upload_file"]
    assert hub[1][1]["folder_path"] == os.path.join(out, "adapter")
    assert f"**Final eval loss:** {result['eval_loss']:.4f}" in hub[2][1]["path_or_fileobj"]


@pytest.mark.parametrize("args, msg", [
    (["--train.push_to_hub", "me/x"], "train.push_to_hub me/x: no Hugging Face token: set HF_TOKEN"),
    (["--train.push_merged", "true"], "train.push_merged: needs train.push_to_hub"),
])
def test_push_without_a_token_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, args, msg):
    from mixtune.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not out.exists()
