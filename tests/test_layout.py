"""The package's shape: imports point down (app -> lightning -> methods/interop -> core/metrics -> losses/io),
no import cycles, the library imports only torch and safetensors, and a missing extra is one clear error."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lora_ensemble"

# rank of each part: a module may import modules of a lower rank, and modules of its own part ("": the facade,
# lora_ensemble/__init__.py, which re-exports core, interop, losses and posterior)
RANKS = {"": 2, "extras": 0, "io": 0, "losses": 0, "core": 1, "metrics": 1, "interop": 2, "methods": 2, "posterior": 2,
         "lightning": 3,
         "app": 4, "analysis": 2}
# third-party packages each part may import (anywhere in its files, at module level or inside functions)
THIRD_PARTY = {
    "extras": set(), "io": {"torch", "safetensors", "huggingface_hub"}, "core": {"torch", "safetensors"}, "losses": {"torch"},
    "metrics": {"torch", "numpy", "torchmetrics"}, "interop": {"torch", "safetensors"}, "methods": {"torch"},
    "posterior": {"torch", "safetensors"},
    "lightning": {"torch", "numpy", "lightning"}, "analysis": {"torch", "numpy"},
    "app": {"torch", "numpy", "lightning", "yaml", "matplotlib", "safetensors", "transformers", "timm", "torchvision",
            "PIL", "peft", "scipy", "datasets", "optuna"},
}
LIBRARY_ONLY = ("lightning", "torchmetrics", "matplotlib", "transformers", "numpy", "yaml", "timm", "torchvision",
                "peft", "PIL", "scipy", "datasets", "huggingface_hub")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(lora_ensemble modules, third-party top-level names) imported anywhere in `path`."""
    own, other = set(), set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "lora_ensemble":
                own.add(n)
            elif n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] != "__future__" \
                    and not (isinstance(node, ast.ImportFrom) and n != names[0]):
                other.add(n.split(".")[0])
    return own, other


def graph() -> dict[str, set[str]]:
    """lora_ensemble module -> the lora_ensemble modules it imports (names that are modules or packages)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        own, _ = imports(path)
        edges[name] = {n for n in own if n in files and n != name}
    return edges


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_points_down_or_stays_in_its_part():
    wrong = []
    for module, targets in graph().items():
        if module == "lora_ensemble":
            continue  # the facade re-exports the library; checked below
        for target in targets:
            if part(target) != part(module) and RANKS[part(target)] >= RANKS[part(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or sideways: " + ", ".join(sorted(wrong))


def test_the_facade_exports_the_library_only():
    assert {part(t) for t in graph()["lora_ensemble"]} <= {"core", "interop", "losses", "posterior"}


def test_the_package_has_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    # a package's __init__ importing its own modules is not a cycle through them
    cycles = [c for c in cycles if not all(x.startswith(c.split(" -> ")[0]) for x in c.split(" -> "))]
    assert not cycles, f"import cycles: {cycles}"


def test_each_part_imports_only_the_third_party_packages_it_declares():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if module == "lora_ensemble":
            continue
        _, other = imports(path)
        extra = other - THIRD_PARTY[part(module)]
        if extra:
            wrong.append(f"{module}: {sorted(extra)}")
    assert not wrong, wrong


def run_with_blocked(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which importing any of `blocked` fails as if it were not installed."""
    prelude = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, importlib.util, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        _find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a)
        import importlib.metadata as md  # packages that ask for a distribution's version first see none
        _distribution = md.distribution
        def distribution(name):
            if name.replace("-", "_") in BLOCKED:
                raise md.PackageNotFoundError(name)
            return _distribution(name)
        md.distribution = distribution
        md.version = lambda name: distribution(name).version
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)


def test_the_library_imports_with_only_torch_and_safetensors():
    proc = run_with_blocked("""
        import torch, lora_ensemble
        from lora_ensemble import LoraEnsemble, LoraEnsembleConfig, export_peft, from_peft, member_cross_entropy
        import lora_ensemble.methods, lora_ensemble.interop, lora_ensemble.core.trunk_cache
        lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
        ens = LoraEnsemble(lin, num_members=2, r=2, target_modules=["0"], head="1")
        print(tuple(ens(torch.randn(5, 4)).shape))
    """, LIBRARY_ONLY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(2, 5, 3)"


@pytest.mark.parametrize("module, missing, extra", [
    ("lora_ensemble.lightning", "lightning", "train"),
    ("lora_ensemble.metrics", "torchmetrics", "train"),
    ("lora_ensemble.app.cli", "yaml", "train"),
    ("lora_ensemble.app.plots", "matplotlib", "train"),
])
def test_a_feature_without_its_extra_is_one_error_naming_the_extra(module, missing, extra):
    proc = run_with_blocked(f"import {module}", (missing,))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"pip install 'lora-ensemble[{extra}]'" in last, proc.stderr


def test_the_command_line_runs_without_transformers():
    """A user of timm / torchvision / plain PyTorch models has no transformers: the commands (which all run
    inside `quiet`) must not need it."""
    proc = run_with_blocked("""
        from lora_ensemble.app.cli import quiet
        with quiet(verbose=False):
            print("ran")
    """, ("transformers",))
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr


@pytest.mark.parametrize("model, missing, extra", [("tiny:bert", "transformers", "demo"),
                                                   ("timm:vit_tiny_patch16_224", "timm", "vision")])
def test_a_model_without_its_extra_is_one_error_naming_the_extra(model, missing, extra):
    proc = run_with_blocked(f"""
        from lora_ensemble.app.builders import build_model
        from lora_ensemble.app.run_config import ModelConfig
        build_model(ModelConfig(name={model!r}), 3, "text" if {model!r}.startswith("tiny") else "image")
    """, (missing,))
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"pip install 'lora-ensemble[{extra}]'" in last, proc.stderr
    assert repr(model) in last
