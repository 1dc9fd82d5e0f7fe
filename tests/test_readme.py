"""The README's usage example runs as written."""

import re
from pathlib import Path

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
