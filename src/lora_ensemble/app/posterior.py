"""`--samples K` of `evaluate` and `predict`: a run's ensemble replaced by K draws per member from the posterior
that `fit` wrote with `training.posterior` (<run>/posterior, see lora_ensemble.posterior).

    run = load_run(run_dir); use_posterior_samples(run, run_dir, 16)   # run.module.method: M * 16 members
"""

from __future__ import annotations

import os
from typing import Any

from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.posterior import LoraPosterior
from lora_ensemble.posterior.posterior import POSTERIOR_CONFIG


def use_posterior_samples(run: Any, run_dir: str, samples: int, seed: int | None = None,
                          scale: float = 1.0) -> dict[str, Any]:
    """Put `post.sample(samples, seed, scale)` in place of the run's trained ensemble (its frozen backbone is
    shared, not copied); the seed defaults to the run's. Returns what results.json records about it."""
    from lora_ensemble.app.runner import POSTERIOR_DIR

    folder = os.path.join(run_dir, POSTERIOR_DIR)
    if not os.path.isfile(os.path.join(folder, POSTERIOR_CONFIG)):
        raise ConfigError(f"--samples needs the posterior a run trained with training.posterior writes "
                          f"({folder}/{POSTERIOR_CONFIG} not found); fit with --set "
                          "'training.posterior={method: swag}' (or tfb)")
    ensemble = run.module.method
    if not isinstance(ensemble, LoraEnsemble):
        raise ConfigError(f"--samples draws LoRA-Ensemble members; this run's method is {type(ensemble).__name__}")
    post = LoraPosterior.from_pretrained(ensemble, folder)
    seed = run.config.seed if seed is None else seed
    run.module.method = post.sample(samples, seed=seed, scale=scale)
    return {"posterior": post.method, "samples": samples, "trained_members": post.num_members,
            "members": post.num_members * samples, "posterior_seed": seed, "posterior_scale": scale}
