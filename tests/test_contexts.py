"""The contexts users run an ensemble in, one tiny model per family: in every cell member m of the ensemble
equals the standalone `ens.member(m)`, member m's loss reaches member m's parameters only, and a training
step leaves every frozen weight bit-identical.

    cells: no_grad | inference_mode | autocast bf16 (CPU; CUDA fp16/bf16 when present) | a bf16 model |
           .to(bf16) after wrapping | torch.compile | gradient checkpointing | lora_dropout > 0 | deepcopy |
           shared trunk
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tiny_models import build, call
from torch import nn

from lora_ensemble import LoraEnsemble

M = 3
FAMILIES = ["bert", "llama_cls", "timm_vit", "torchvision_vit", "gpt2_lm"]
CHECKPOINTING = {"bert", "llama_cls", "gpt2_lm", "timm_vit"}  # torchvision's ViT has no checkpointing switch
EXACT = dict(atol=2e-5, rtol=1e-4)
LOW = dict(atol=0.1, rtol=0.1)  # bfloat16 keeps ~3 significant digits


def wrap(family: str, dtype: torch.dtype | None = None, **config) -> tuple[LoraEnsemble, callable]:
    """A tiny model without dropout (so that training-mode outputs are deterministic) wrapped with distinct
    non-zero member deltas."""
    model, make_batch = build(family)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if hasattr(model, "config"):
        model.config.use_cache = False
    if dtype is not None:
        model.to(dtype)
    ens = LoraEnsemble(model, num_members=M, r=2, init_gain=1.0, **config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ens.member_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return ens, make_batch


def batch_of(make_batch, dtype: torch.dtype = torch.float32, seed: int = 0):
    batch = make_batch(4, torch.Generator().manual_seed(seed))
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return tuple(cast(v) for v in batch) if isinstance(batch, tuple) else {k: cast(v) for k, v in batch.items()}


def assert_members_match(out: torch.Tensor, members: list[torch.Tensor], tol: dict) -> None:
    assert out.shape[0] == M
    for m in range(M):
        torch.testing.assert_close(out[m].float(), members[m].float(), **tol, msg=f"member {m}")
    spread = (members[0].float() - members[1].float()).abs().max()
    assert spread > 3 * tol["atol"], "members too alike for this check to fail"


def assert_grads_isolated_and_frozen_unchanged(ens: LoraEnsemble, forward) -> None:
    """Member 1's loss reaches member 1's slices only; an AdamW step changes no frozen weight."""
    params = ens.member_parameters()
    frozen = {n: p.detach().clone() for n, p in ens.named_parameters() if not p.requires_grad}
    forward()[1].float().pow(2).mean().backward()
    touched = 0
    for name, p in params.items():
        assert p.grad is not None, name
        for m in (0, 2):
            assert torch.count_nonzero(p.grad[m]) == 0, f"{name}: member {m} got gradient from member 1's loss"
        touched += int(torch.count_nonzero(p.grad[1]) > 0)
    assert touched > 0
    torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1).step()
    for n, p in ens.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def members_of(ens: LoraEnsemble, batch, train: bool = False, context=contextlib.nullcontext) -> list[torch.Tensor]:
    out = []
    for m in range(M):
        member = ens.member(m).train(train)
        with context():
            out.append(call(member, batch).detach())
    return out


# ---- evaluation contexts ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_eval_under_no_grad_and_inference_mode(family, context):
    ens, make_batch = wrap(family)
    ens.eval()
    batch = batch_of(make_batch)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    with ctx():
        out = call(ens, batch)
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)


def _autocast_devices() -> list[tuple[str, torch.dtype]]:
    cells = [("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        cells += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    return cells


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device, dtype", _autocast_devices())
def test_autocast(family, device, dtype):
    ens, make_batch = wrap(family)
    ens.to(device)
    batch = batch_of(make_batch)
    batch = tuple(v.to(device) for v in batch) if isinstance(batch, tuple) else {k: v.to(device) for k, v in batch.items()}
    autocast = lambda: torch.autocast(device, dtype=dtype)  # noqa: E731
    with torch.no_grad(), autocast():
        out = call(ens.eval(), batch)
    assert_members_match(out, members_of(ens, batch, context=autocast), LOW)

    def forward():
        with autocast():
            return call(ens.train(), batch)

    assert_grads_isolated_and_frozen_unchanged(ens, forward)


# ---- dtypes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_model_gets_float32_adapters_and_heads_that_learn(family):
    ens, make_batch = wrap(family, dtype=torch.bfloat16)
    params = ens.member_parameters()
    assert {p.dtype for p in params.values()} == {torch.float32}            # as PEFT keeps adapters
    assert {p.dtype for n, p in ens.model.named_parameters() if n not in params} == {torch.bfloat16}
    batch = batch_of(make_batch, torch.bfloat16)
    with torch.no_grad():
        out = call(ens.eval(), batch)
    assert out.dtype == torch.bfloat16
    members = members_of(ens, batch, context=torch.no_grad)
    assert {p.dtype for p in ens.member(0).parameters()} == {torch.bfloat16}  # a plain bf16 model again
    assert_members_match(out, members, LOW)
    # AdamW steps of 1e-4, far below bf16's resolution at the weights' scale, still land
    name, p = next((n, p) for n, p in params.items() if "lora_A" in n)
    before = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.0)
    call(ens.train(), batch).float().pow(2).mean().backward()
    opt.step()
    step, moved = p.detach() - before, p.grad != 0
    assert moved.any() and (step[moved] != 0).all()                         # the float32 adapter moved ...
    lost = (before.bfloat16() + step.bfloat16()) == before.bfloat16()
    assert lost[moved].float().mean() > 0.5                                 # ... where a bf16 one mostly would not
    ens.zero_grad()
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(ens.train(), batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_to_dtype_after_wrapping(family):
    ens, make_batch = wrap(family)
    ens.to(torch.bfloat16)
    assert {p.dtype for p in ens.parameters()} == {torch.bfloat16}
    batch = batch_of(make_batch, torch.bfloat16)
    with torch.no_grad():
        out = call(ens.eval(), batch)
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), LOW)
    ens.to(torch.float32)
    batch = batch_of(make_batch)
    with torch.no_grad():
        out = call(ens, batch)
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)


# ---- compile, checkpointing, dropout, copies, the shared trunk ------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile(family):
    torch._dynamo.reset()
    ens, make_batch = wrap(family)
    batch = batch_of(make_batch)
    compiled = torch.compile(ens, backend="aot_eager")
    with torch.no_grad():
        out = call(compiled.eval(), batch)
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(compiled.train(), batch))


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.set_grad_checkpointing(True)  # timm


@pytest.mark.parametrize("family", sorted(CHECKPOINTING))
def test_gradient_checkpointing_in_training(family):
    plain, make_batch = wrap(family)
    batch = batch_of(make_batch)
    call(plain.train(), batch).float().pow(2).mean().backward()
    expected = {n: p.grad.clone() for n, p in plain.member_parameters().items()}
    ens, _ = wrap(family)
    _enable_checkpointing(ens.model)
    ens.train()
    out = call(ens, batch)
    assert_members_match(out.detach(), members_of(ens, batch, train=True), EXACT)
    out.float().pow(2).mean().backward()
    for name, grad in expected.items():          # recomputation in backward gives the same gradients
        torch.testing.assert_close(ens.member_parameters()[name].grad, grad, **EXACT, msg=name)
    ens.zero_grad()
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(ens, batch))


@pytest.mark.parametrize("family", sorted(CHECKPOINTING - {"llama_cls"}))  # llama_cls: no shared trunk at all
def test_gradient_checkpointing_with_the_shared_trunk_is_refused_in_training(family):
    ens, make_batch = wrap(family, layers=[-1], share_trunk=True)
    _enable_checkpointing(ens.model)
    batch = batch_of(make_batch)
    with pytest.raises(ValueError, match="share_trunk does not work with gradient checkpointing"):
        call(ens.train(), batch)
    with torch.no_grad():                        # evaluation has no recomputation: fine
        assert_members_match(call(ens.eval(), batch), members_of(ens, batch, context=torch.no_grad), EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_dropout(family):
    ens, make_batch = wrap(family, lora_dropout=0.3)
    batch = batch_of(make_batch)
    with torch.no_grad():
        out = call(ens.eval(), batch)
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)
    torch.manual_seed(0)
    a = call(ens.train(), batch).detach()
    b = call(ens, batch).detach()
    assert not torch.allclose(a, b)                                     # dropout is on in training
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(ens.train(), batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy(family):
    original, make_batch = wrap(family)
    ens = copy.deepcopy(original)
    contracts = {id(m.row_contract) for m in ens.modules() if hasattr(m, "check_rows") and m.row_contract is not None}
    assert contracts == {id(ens.row_contract)} and ens.row_contract is not original.row_contract
    batch = batch_of(make_batch)
    with torch.no_grad():
        out = call(ens.eval(), batch)
        torch.testing.assert_close(out, call(original.eval(), batch))
    assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(ens.train(), batch))
    assert all(p.grad is None for p in original.parameters())          # the copy trains alone


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("share_trunk", [False, True])
def test_adapters_in_the_last_block_with_and_without_the_shared_trunk(family, share_trunk):
    ens, make_batch = wrap(family, layers=[-1], share_trunk=share_trunk)
    batch = batch_of(make_batch)
    if share_trunk and family == "llama_cls":  # pools at the last token of the B original input_ids
        with pytest.raises(ValueError, match="share_trunk=False"):
            call(ens, batch)
        return
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = call(ens.eval(), batch)
        assert_members_match(out, members_of(ens, batch, context=torch.no_grad), EXACT)
    assert_grads_isolated_and_frozen_unchanged(ens, lambda: call(ens.train(), batch))
