"""Members are never mixed silently: every member-aware module checks the rows it receives against its
ensemble's row contract, and torch's sequence-first Transformer layers are adapted on the right axis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_ensemble import LoraEnsemble
from lora_ensemble.methods import build_method

M = 3


def nonzero(ens: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ens.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return ens


class TorchEncoder(nn.Module):
    """A classifier on torch's own nn.TransformerEncoder; inputs (B, T, E) either way."""

    def __init__(self, batch_first: bool, nested: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.fc = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=padding_mask)
        return self.fc(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("targets", ["qv", "all-linear"])
def test_torch_transformer_layers_in_either_layout_keep_members_apart(batch_first, targets):
    torch.manual_seed(0)
    ens = nonzero(LoraEnsemble(TorchEncoder(batch_first), num_members=M, r=2, target_modules=targets, head="fc",
                               init_gain=1.0)).eval()
    x = torch.randn(4, 6, 16)                     # T = 6 = M * 2: the old divisibility check could not tell
    with torch.no_grad():
        out = ens(x)
        members = [ens.member(m).eval()(x) for m in range(M)]
    for m in range(M):
        torch.testing.assert_close(out[m], members[m], atol=2e-5, rtol=1e-4)
    assert (members[0] - members[1]).abs().max() > 1e-2
    out = ens.train()(x)
    out[1].pow(2).mean().backward()
    for name, p in ens.member_parameters().items():
        assert torch.count_nonzero(p.grad[0]) == 0 and torch.count_nonzero(p.grad[2]) == 0, name


def test_the_nested_tensor_fast_path_of_nn_transformer_encoder_does_not_bypass_the_adapters():
    torch.manual_seed(0)
    ens = nonzero(LoraEnsemble(TorchEncoder(batch_first=True, nested=True), num_members=M, r=2,
                               target_modules="all-linear", head="fc", init_gain=1.0)).eval()
    x, pad = torch.randn(4, 6, 16), torch.zeros(4, 6, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        out = ens(x, pad)
        for m in range(M):
            torch.testing.assert_close(out[m], ens.member(m).eval()(x, pad), atol=2e-5, rtol=1e-4)


class SequenceFirstByHand(nn.Module):
    """Transposes to (T, B, E) before its projection: a layout the ensemble cannot know about."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # x: (B, T, E)
        return self.fc(self.proj(x.transpose(0, 1)).mean(0))


def test_a_module_that_receives_another_row_count_than_the_contract_raises_naming_itself():
    ens = nonzero(LoraEnsemble(SequenceFirstByHand(), num_members=M, r=2, target_modules=["proj"], head="fc"))
    x = torch.randn(2, 9, 8)                       # T = 9 is a multiple of M: only the contract sees it
    with pytest.raises(ValueError, match=r"LoraEnsembleLinear 'proj' received 9 rows .* 3 members x batch 2 = 6"):
        ens(x)
    with pytest.raises(ValueError, match="LoraEnsembleLinear 'proj'"):
        with torch.inference_mode():
            ens(x)


def test_a_stacked_head_that_receives_other_rows_raises_naming_itself():
    class FlattensBeforeTheHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):                          # the head sees (T*B, E) rows, time-major
            return self.fc(self.q(x).transpose(0, 1).reshape(-1, 8)).view(x.shape[1], x.shape[0], 3).mean(0)

    ens = LoraEnsemble(FlattensBeforeTheHead(), num_members=M, r=2, target_modules=["q"], head="fc")
    with pytest.raises(ValueError, match="StackedLinear 'fc' received 12 rows"):
        ens(torch.randn(2, 2, 8))


def test_batch_ensemble_layers_check_the_contract_too():
    method = build_method("batch_ensemble", SequenceFirstByHand(), num_members=M, target_modules=["proj"], head="fc")
    with pytest.raises(ValueError, match="BatchEnsembleLinear 'proj' received 9 rows"):
        method(torch.randn(2, 9, 8))
    ens = build_method("batch_ensemble", TorchEncoder(batch_first=False), num_members=M,
                       target_modules=["linear1", "linear2"], head="fc").eval()
    with torch.no_grad():
        x = torch.randn(4, 6, 16)
        out = ens(x)
        alone = [ens(x[i:i + 1])[:, 0] for i in range(4)]   # each sample alone: members must not mix samples
    torch.testing.assert_close(out, torch.stack(alone, dim=1), atol=2e-5, rtol=1e-4)


def test_share_trunk_refuses_sequence_first_blocks():
    with pytest.raises(ValueError, match="share_trunk does not support sequence-first"):
        LoraEnsemble(TorchEncoder(batch_first=False), num_members=M, r=2, head="fc", layers=[-1], share_trunk=True)


def test_a_second_forward_while_one_is_running_is_refused():
    ens = LoraEnsemble(SequenceFirstByHand(), num_members=M, r=2, target_modules=["fc"], head=None)
    ens.row_contract.open(6)                       # as a forward of another thread would hold it
    with pytest.raises(RuntimeError, match="entered again"):
        ens(torch.randn(2, 3, 8).transpose(0, 1))
    ens.row_contract.close()
    assert ens(torch.randn(2, 3, 8).transpose(0, 1)).shape[:2] == (M, 3)
