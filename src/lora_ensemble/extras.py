"""Optional dependencies: which pip extra brings which package, and one clear error when one is missing.

`import lora_ensemble` needs only torch and safetensors. The training routine, the metrics and the command line
need the extra `train`; the offline demo `demo`; timm / torchvision models `vision`; PEFT comparisons `peft`;
GGUF language models `llm` (see pyproject.toml, `[project.optional-dependencies]`).

    require("train", "lightning", "yaml")   # ImportError naming the extra when one of them is missing
"""

from __future__ import annotations

import importlib.util

# module name -> the distribution pip installs it from (where they differ)
DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


def missing(*modules: str) -> list[str]:
    """The top-level modules among `modules` that cannot be imported (not installed)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, *modules: str, feature: str | None = None) -> None:
    """ImportError naming `extra` (and the missing packages) unless every module of `modules` is installed."""
    absent = missing(*modules)
    if absent:
        packages = ", ".join(DISTRIBUTIONS.get(m, m) for m in absent)
        raise ImportError(
            f"{feature or 'this part of lora-ensemble'} needs {packages}, which is not installed: "
            f"pip install 'lora-ensemble[{extra}]'"
        )
