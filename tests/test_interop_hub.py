"""Checkpoints named by a local folder or a Hugging Face Hub model id."""

from __future__ import annotations

import pytest
from tiny_models import build

from lora_ensemble import from_peft
from lora_ensemble.interop import resolve_checkpoint


def test_a_local_folder_is_used_as_is(tmp_path):
    assert resolve_checkpoint(tmp_path) == str(tmp_path)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="file.json is a file"):
        resolve_checkpoint(tmp_path / "file.json")
    with pytest.raises(FileNotFoundError, match="not a valid Hugging Face Hub model id"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "folder"))


def test_a_model_id_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'someone/lora-ensemble-demo' is not a local folder.*HF_HUB_OFFLINE=1"):
        resolve_checkpoint("someone/lora-ensemble-demo")
    model = build("bert")[0]
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        from_peft(model, ["someone/adapter-0", "someone/adapter-1"])
    assert not any(n.endswith("lora_A") for n, _ in model.named_parameters())


def test_a_model_id_online_is_downloaded_with_huggingface_hub(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint("someone/ens", revision="v1") == str(tmp_path)
    assert seen["repo_id"] == "someone/ens" and seen["revision"] == "v1" and seen["local_files_only"] is False
    assert seen["allow_patterns"] == ["*.json", "*.safetensors"]

    def unreachable(repo_id, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(OSError, match=r"'someone/ens' is not a local folder and could not be fetched.*no route to host"):
        resolve_checkpoint("someone/ens")
