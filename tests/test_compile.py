"""torch.compile: the adapted layers trace without graph breaks and compiled ensembles give the same outputs."""

import pytest
import torch
from tiny_models import build, call

from lora_ensemble import LoraEnsemble
from lora_ensemble.core.heads import StackedLinear
from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear

M = 3


def _nonzero(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("make_layer", [
    lambda: LoraEnsembleLinear(torch.nn.Linear(8, 6), M, r=2, scaling=1.0),
    lambda: LoraEnsembleFusedLinear(torch.nn.Linear(8, 12), ["q", "v"], M, r=2, scaling=0.5),
    lambda: LoraEnsembleFusedLinear(torch.nn.Linear(8, 12), ["q", "k", "v"], M, r=2, scaling=1.0),
    lambda: StackedLinear.from_linear(torch.nn.Linear(8, 5), M, "random", torch.Generator().manual_seed(0)),
], ids=["linear", "fused_qv", "fused_qkv", "stacked_head"])
def test_adapted_layers_compile_as_one_graph(make_layer):
    layer = _nonzero(make_layer())
    x = torch.randn(M * 4, 7, 8)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), layer(x))


def test_compiled_ensemble_gives_the_same_outputs_and_gradients():
    torch._dynamo.reset()
    model, make_batch = build("plain")
    ens = _nonzero(LoraEnsemble(model, num_members=M, r=2, init_gain=1.0))
    batch = make_batch(4, torch.Generator().manual_seed(0))
    eager = call(ens, batch)
    compiled = call(torch.compile(ens, backend="inductor"), batch)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    g_eager = torch.autograd.grad(eager.sum(), list(ens.member_parameters().values()))
    g_compiled = torch.autograd.grad(compiled.sum(), list(ens.member_parameters().values()))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
