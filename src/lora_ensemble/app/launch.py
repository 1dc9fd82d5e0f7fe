"""Which process of a multi-process launch this is, from the launcher's environment alone (before any Trainer).

torchrun sets RANK, SLURM sets SLURM_PROCID, Lightning's DDP launcher re-runs the command line in child processes
with LOCAL_RANK (and NODE_RANK on other nodes): only the process that is 0 in all of them prepares a run folder.
"""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def launch_rank() -> int:
    """The first non-zero rank the environment names, else 0."""
    ranks = [os.environ.get(key) for key in RANK_VARIABLES]
    return next((int(r) for r in ranks if r not in (None, "", "0") and r.lstrip("-").isdigit()), 0)
