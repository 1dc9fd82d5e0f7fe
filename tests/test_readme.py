"""The README's usage example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"### Wrap your model in three lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["member_logits"].shape) == (4, 2, 3)
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    import torch

    with torch.no_grad():
        ens, ens2, batch = namespace["ens"].eval(), namespace["ens2"].eval(), namespace["batch"]
        torch.testing.assert_close(ens2(**batch), ens(**batch))


def test_readme_trainer_example_trains_the_members_with_the_papers_loss(tmp_path, monkeypatch):
    """The Hugging Face Trainer example, as written: the members train, the frozen weights do not, and the
    Trainer's loss is the paper's member_cross_entropy."""
    import torch
    import transformers

    from lora_ensemble import member_cross_entropy

    code = re.search(r"### Train with Hugging Face `Trainer`\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    start: dict = {}
    original_train = transformers.Trainer.train

    def train_and_remember(self, *args, **kwargs):  # the state before training, to compare with after
        start.update({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", train_and_remember)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ens, metrics, data = namespace["ens"], namespace["metrics"], namespace["data"]
    trained = {"model." + n for n in ens.member_parameters()}  # member_parameters() names are inside ens.model
    after = dict(ens.named_parameters())
    assert all(not torch.equal(after[n], start[n]) for n in trained)                  # every member tensor trained
    assert all(torch.equal(after[n], start[n]) for n in start if n not in trained)    # frozen weights unchanged
    assert (tmp_path / "trainer_out" / "ensemble" / "adapter_model.safetensors").is_file()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    batch = torch.utils.data.default_collate(data[:8])
    ens.eval()
    with torch.no_grad():
        labels = batch.pop("labels")
        expected = member_cross_entropy(ens(**batch, return_dict=False), labels)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
