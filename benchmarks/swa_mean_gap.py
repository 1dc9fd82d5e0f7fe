"""Where does SWAG's NLL go? The SWA mean of LoRA factors against the mean of the updates they make.

docs/posterior.md found SWAG's draws lose NLL against the trained members, and the loss already in the SWA mean
(scale 0). Two explanations, tested here on the posterior study's runs (same settings, same seeds):

  1. the factors: SWAG averages A and B separately, and mean_t(B_t) mean_t(A_t) is not mean_t(B_t A_t), the
     average of the snapshots' updates dW_t = B_t A_t. Their difference is the factors' cross-covariance,
     mean_t(B_t A_t) - mean(B) mean(A) = 1/n sum_t (B_t - mean B)(A_t - mean A);
  2. the trajectory: the snapshots span most of training (steps 18..45 of 45), so the mean sits behind the
     end point however it is averaged.

Per seed, the study's `ens4` (cosine schedule) and `ens4_swa` (constant swa_lr) runs are trained again with the
SWAG rank raised to 10 = the number of snapshots (the collection changes nothing in training, so the trained
members are the study's own: `final` below must equal the study's lora_ensemble-4 / lora_ensemble-4-swa cells).
With every deviation kept, the snapshots are recovered exactly from SWAG's state, backwards from the final mean:

    theta_n = D_n + mean^(n),   mean^(i-1) = mean^(i) - D_i / (i - 1)     (D_i = theta_i - mean^(i), as swag.py)

Then each member is evaluated with (cells):

    final              the trained tensors
    mean_AB            every tensor averaged over the n snapshots (SWAG's mean; posterior scale 0)
    mean_dW            adapters whose update is exactly mean_t(B_t A_t): rank n r, A = [A_1; ...; A_n] and
                       B = [B_1, ..., B_n] / n, so that B A = 1/n sum_t B_t A_t; heads averaged as in mean_AB
    mean_AB_last5      mean_AB over the last 5 snapshots (a later start of the collection)
    mean_dW_last5      mean_dW over the last 5 snapshots
    final+mean_head    the trained adapters with the averaged heads
    mean_AB+final_head the averaged adapters with the trained heads

and the gap of the factors per adapted projection and member: |mean(BA) - mean(B) mean(A)|_F / |mean(BA)|_F and
the distance of the end point, |B_n A_n - mean(BA)|_F / |mean(BA)|_F (medians over projections and members).

    nohup nice -n 5 python benchmarks/swa_mean_gap.py --seeds 0 1 2 > runs/posterior/swa_gap.log 2>&1 &
    python benchmarks/swa_mean_gap.py --table

Resumable: a finished (seed, run) is docs/posterior/swa_gap/<seed>-<run>.json; run folders go to
runs/posterior/swa_gap/seed<seed>/<run>/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lora_ensemble.posterior.tfb import is_adapter, is_lora_A

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posterior_study as study  # SIZE, CONFIG, the SWAG settings of the study's runs

OUT = study.OUT / "swa_gap"
RUNS = study.RUNS / "swa_gap"
NUM_SNAPSHOTS = 10  # steps 18, 21, ..., 45 (collect_every_n_steps 3 from the second of 3 epochs of 15 steps)
RUN_SETS = {name: [s.replace("rank: 5", f"rank: {NUM_SNAPSHOTS}") for s in study.RUN_SETS[name]]
            for name in ("ens4", "ens4_swa")}
STUDY_CELL = {"ens4": "lora_ensemble-4", "ens4_swa": "lora_ensemble-4-swa"}  # the study's cell of `final`
CELLS = ("final", "mean_AB", "mean_dW", "mean_AB_last5", "mean_dW_last5", "final+mean_head", "mean_AB+final_head")
KEYS = ("acc", "nll", "ece", "brier", "ood/auroc_entropy", "ood/auroc_mi")


def snapshots(swag: Any) -> list[dict[str, torch.Tensor]]:
    """The n collected snapshots {name: (M, ...)} in order, recovered from SWAG's state (all n deviations kept)."""
    n = swag.num_collected
    if swag.num_deviations != n or swag.rank < n:
        raise ValueError(f"{n} snapshots but {swag.num_deviations} deviations kept: raise the SWAG rank to {n}")
    mean = {k: v.clone() for k, v in swag.mean.items()}
    out = []
    for i in range(n, 0, -1):  # deviation of snapshot i sits in ring slot i - 1 (no wrap: rank >= n)
        dev = {k: swag.deviations[k][i - 1] for k in mean}
        out.append({k: dev[k] + mean[k] for k in mean})
        if i > 1:
            mean = {k: mean[k] - dev[k] / (i - 1) for k in mean}
    return out[::-1]


def average(snaps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k] for s in snaps) / len(snaps) for k in snaps[0]}


def adapter_pairs(params: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted projection: lora_A (M, r, in) with lora_B (M, out, r)."""
    pairs = [(n, n[:-1] + "B") for n in params if is_lora_A(n)]
    for a, b in pairs:
        if params[a].dim() != 3 or params[b].dim() != 3:
            raise ValueError(f"{a}: only unfused adapters (A (M, r, in), B (M, out, r)) are handled here")
    return pairs


def mean_dw_tensors(snaps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rank n r adapters with B A = 1/n sum_t B_t A_t (A stacked along the rank, B side by side over n), the
    other tensors (heads) averaged."""
    out = average(snaps)
    for a, b in adapter_pairs(snaps[0]):
        out[a] = torch.cat([s[a] for s in snaps], dim=1)               # (M, n r, in)
        out[b] = torch.cat([s[b] for s in snaps], dim=2) / len(snaps)  # (M, out, n r)
    return out


def factor_gap(snaps: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Medians over projections and members of the relative gaps described in the module docstring."""
    mean = average(snaps)
    gap, end = [], []
    for a, b in adapter_pairs(snaps[0]):
        mean_dw = sum(s[b] @ s[a] for s in snaps) / len(snaps)  # (M, out, in)
        norm = mean_dw.flatten(1).norm(dim=1)
        gap += ((mean_dw - mean[b] @ mean[a]).flatten(1).norm(dim=1) / norm).tolist()
        end += ((snaps[-1][b] @ snaps[-1][a] - mean_dw).flatten(1).norm(dim=1) / norm).tolist()
    return {"factor_gap_median": statistics.median(gap), "end_to_mean_median": statistics.median(end)}


def head_norms(snaps: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The heads' weight rows (`...weight` outside the adapters, (M, C, d)): mean row norm at the first snapshot,
    the last, and of the snapshots' average."""
    names = [n for n in snaps[0] if not is_adapter(n) and n.endswith("weight")]
    norm = lambda t: t.flatten(2).norm(dim=-1).mean().item()
    return {"head_norm_first": statistics.mean(norm(snaps[0][n]) for n in names),
            "head_norm_last": statistics.mean(norm(snaps[-1][n]) for n in names),
            "head_norm_mean": statistics.mean(norm(average(snaps)[n]) for n in names)}


def variants(final: dict[str, torch.Tensor], snaps: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    mean_ab = average(snaps)
    return {
        "final": final,
        "mean_AB": mean_ab,
        "mean_dW": mean_dw_tensors(snaps),
        "mean_AB_last5": average(snaps[-5:]),
        "mean_dW_last5": mean_dw_tensors(snaps[-5:]),
        "final+mean_head": {k: v if is_adapter(k) else mean_ab[k] for k, v in final.items()},
        "mean_AB+final_head": {k: mean_ab[k] if is_adapter(k) else v for k, v in final.items()},
    }


def measure_run(seed: int, run: str) -> dict[str, Any]:
    from lora_ensemble.app.posterior import load_posterior
    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import fit, load_run, make_trainer, test
    from lora_ensemble.core.twin import ensemble_like

    folder = RUNS / f"seed{seed}" / run
    overrides = [*study.SIZE, f"seed={seed}", *RUN_SETS[run]]
    if not (folder / "results.json").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] fit seed {seed} {run}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            fit(load_run_config(study.CONFIG, overrides), str(folder), overwrite=True)
    loaded = load_run(str(folder))
    trained = loaded.module.method
    post = load_posterior(loaded, str(folder))
    snaps = snapshots(post.swag)
    if len(snaps) != NUM_SNAPSHOTS:
        raise RuntimeError(f"seed {seed} {run}: {len(snaps)} snapshots collected, expected {NUM_SNAPSHOTS}")
    params = trained.member_parameters()
    final = {k: v.detach().double() for k, v in params.items()}
    # the recovered last snapshot is the trained state (the last collection is at the last step)
    recovered = max((snaps[-1][k] - final[k]).abs().max().item() for k in final)
    row: dict[str, Any] = {"seed": seed, "run": run, "num_snapshots": len(snaps),
                           "last_snapshot_max_abs_diff": recovered, **factor_gap(snaps), **head_norms(snaps),
                           "cells": {}}
    r = trained.ensemble_config.r
    for cell, tensors in variants(final, snaps).items():
        rank = tensors[adapter_pairs(tensors)[0][0]].shape[1]
        ens = trained if cell == "final" else ensemble_like(trained, trained.num_members, r=rank)
        if cell != "final":
            ens.load_member_state({k: v.to(params[k].dtype) for k, v in tensors.items()}, source=cell)
        loaded.module.method = ens
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = test(loaded, make_trainer(loaded.config, None))["metrics"]
        row["cells"][cell] = {"rank": rank, **{key: metrics[key] for key in KEYS if key in metrics}}
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {run} {cell} (rank {rank}, r {r}): "
              f"nll {metrics['nll']:.4f} acc {metrics['acc']:.4f}", flush=True)
    study_cell = study.OUT / "cells" / f"{seed}-{STUDY_CELL[run]}.json"
    if study_cell.is_file():  # the same training as the study's run: the same trained members
        row["study_final_nll"] = json.loads(study_cell.read_text())["nll"]
    row.update(overrides=overrides, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU")
    return row


def add_head_norms() -> None:
    """Add head_norms to the measured rows that lack them, from their run folders (no evaluation)."""
    from lora_ensemble.app.posterior import load_posterior
    from lora_ensemble.app.runner import load_run
    from lora_ensemble.io import atomic_write_bytes

    for path in sorted(OUT.glob("*.json")):
        row = json.loads(path.read_text())
        if "head_norm_last" not in row:
            folder = str(RUNS / f"seed{row['seed']}" / row["run"])
            loaded = load_run(folder, with_data=False)
            row.update(head_norms(snapshots(load_posterior(loaded, folder).swag)))
            atomic_write_bytes(path, json.dumps(row, indent=2).encode())


def measure(seeds: list[int]) -> None:
    from lora_ensemble.io import atomic_write_bytes

    OUT.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for run in RUN_SETS:
            path = OUT / f"{seed}-{run}.json"
            if not path.is_file():
                atomic_write_bytes(path, json.dumps(measure_run(seed, run), indent=2).encode())


def table() -> str:
    from lora_ensemble.app.stats import format_interval

    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    lines = ["| run | cell | rank | seeds | acc | NLL | Δ NLL to final | ECE | OOD AUROC (entropy) | OOD AUROC (MI) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in RUN_SETS:
        got = [r for r in rows if r["run"] == run]
        for cell in CELLS:
            col = lambda key, cell=cell, got=got: [r["cells"][cell][key] for r in got]
            delta = [r["cells"][cell]["nll"] - r["cells"]["final"]["nll"] for r in got]
            lines.append(f"| {run} | {cell} | {got[0]['cells'][cell]['rank']} | {','.join(str(r['seed']) for r in got)} "
                         f"| {format_interval(col('acc'))} | {format_interval(col('nll'))} | "
                         f"{'' if cell == 'final' else format_interval(delta, signed=True)} | {format_interval(col('ece'))} "
                         f"| {format_interval(col('ood/auroc_entropy'))} | {format_interval(col('ood/auroc_mi'))} |")
    lines += ["", ("| run | seeds | factor gap \\|mean(BA) - mean(B) mean(A)\\| / \\|mean(BA)\\| | end point "
                   "\\|B_n A_n - mean(BA)\\| / \\|mean(BA)\\| | head row norm: first / last snapshot / average "
                   "| final NLL here / in the study |"), "|---|---|---|---|---|---|"]
    for run in RUN_SETS:
        got = [r for r in rows if r["run"] == run]
        same = ", ".join(f"{r['cells']['final']['nll']:.7f} / {r.get('study_final_nll', float('nan')):.7f}" for r in got)
        lines.append(f"| {run} | {','.join(str(r['seed']) for r in got)} | "
                     f"{format_interval([r['factor_gap_median'] for r in got])} | "
                     f"{format_interval([r['end_to_mean_median'] for r in got])} | "
                     f"{' / '.join(format_interval([r[k] for r in got], 2) for k in ('head_norm_first', 'head_norm_last', 'head_norm_mean'))} "
                     f"| {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table", action="store_true", help="print the table of the measured runs")
    p.add_argument("--head-norms", action="store_true", help="add the heads' norms to rows measured without them")
    args = p.parse_args(argv)
    if args.head_norms:
        add_head_norms()
    elif not args.table:
        measure(args.seeds)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
