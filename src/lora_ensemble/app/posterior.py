"""`--samples K` of `evaluate` and `predict`: a run's ensemble replaced by K draws per member from the posterior
that `fit` wrote with `training.posterior` (<run>/posterior, see lora_ensemble.posterior), or that
`lora-ensemble posterior --checkpoint RUN` (`calibrate_tfb`) fitted afterwards on a finished run (TFB needs no
training: sigma is found on the run's validation split).

    run = load_run(run_dir); use_posterior_samples(run, run_dir, 16)   # run.module.method: M * 16 members
    evaluate_samples(run, run_dir, 64, member_chunk_size=32)           # test metrics, 32 sampled members a pass

With `member_chunk_size`, the sampled members run in chunks of that many (each chunk drawn on its own on the
shared backbone, `LoraPosterior.member_logits`) and their logits are concatenated before the metrics: the same
numbers as the whole sampled ensemble, at the memory of one chunk (K = 64 on a laptop).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.posterior import LoraPosterior
from lora_ensemble.posterior.posterior import POSTERIOR_CONFIG


def load_posterior(run: Any, run_dir: str) -> LoraPosterior:
    """The posterior of the run in `run_dir` on the run's trained ensemble; ConfigError when there is none."""
    from lora_ensemble.app.runner import POSTERIOR_DIR

    folder = os.path.join(run_dir, POSTERIOR_DIR)
    if not os.path.isfile(os.path.join(folder, POSTERIOR_CONFIG)):
        raise ConfigError(f"--samples needs the posterior a run trained with training.posterior writes "
                          f"({folder}/{POSTERIOR_CONFIG} not found); fit with --set "
                          "'training.posterior={method: swag}' (or tfb)")
    ensemble = run.module.method
    if not isinstance(ensemble, LoraEnsemble):
        raise ConfigError(f"--samples draws LoRA-Ensemble members; this run's method is {type(ensemble).__name__}")
    return LoraPosterior.from_pretrained(ensemble, folder)


def calibrate_tfb(run: Any, run_dir: str, max_nll_increase: float = 0.003, overwrite: bool = False) -> dict[str, Any]:
    """TFB on a finished run: `LoraPosterior(ensemble, "tfb").calibrate(validation batches, max_nll_increase)`,
    saved to <run>/posterior (what `training.posterior={method: tfb}` writes at the end of a fit), so that
    `evaluate --samples K` and `predict --samples K` draw from it. The anchor set is the run's validation split,
    never the test split. An existing posterior is replaced only with `overwrite`. Returns the calibration."""
    from lora_ensemble.app.runner import POSTERIOR_DIR

    folder = os.path.join(run_dir, POSTERIOR_DIR)
    if os.path.isfile(os.path.join(folder, POSTERIOR_CONFIG)) and not overwrite:
        raise ConfigError(f"{folder} already holds a posterior; pass --overwrite to replace it")
    ensemble = run.module.method
    if not isinstance(ensemble, LoraEnsemble):
        raise ConfigError(f"a posterior is over the members of a LoRA-Ensemble; this run's method is "
                          f"{type(ensemble).__name__}")
    loader = run.loader("val")
    if loader is None:
        raise ConfigError("TFB calibrates sigma on the validation split, and this run has none (data.val_size)")
    post = LoraPosterior(ensemble, "tfb")
    calibration = post.calibrate(loader, max_nll_increase, seed=run.config.seed)
    post.save_pretrained(folder)
    return {"posterior": "tfb", "path": folder, "max_nll_increase": float(max_nll_increase),
            "sigma": calibration.sigma.tolist(), "increase": calibration.increase.tolist(),
            "num_anchor": calibration.num_anchor}


def _info(post: LoraPosterior, samples: int, seed: int, scale: float) -> dict[str, Any]:
    return {"posterior": post.method, "samples": samples, "trained_members": post.num_members,
            "members": post.num_members * samples, "posterior_seed": seed, "posterior_scale": scale}


def use_posterior_samples(run: Any, run_dir: str, samples: int, seed: int | None = None,
                          scale: float = 1.0) -> dict[str, Any]:
    """Put `post.sample(samples, seed, scale)` in place of the run's trained ensemble (its frozen backbone is
    shared, not copied); the seed defaults to the run's. Returns what results.json records about it."""
    post = load_posterior(run, run_dir)
    seed = run.config.seed if seed is None else seed
    run.module.method = post.sample(samples, seed=seed, scale=scale)
    return _info(post, samples, seed, scale)


def sampled_member_logits(run: Any, run_dir: str, samples: int, member_chunk_size: int | None = None,
                          seed: int | None = None, scale: float = 1.0) -> Callable[[list], Tensor]:
    """`batches -> (M * samples, N, C)`: the member logits of `sample(samples, seed, scale)` of the run's
    posterior over a list of batches, `member_chunk_size` sampled members per pass (`LoraPosterior.member_logits`;
    the same logits as the whole sampled ensemble). The seed defaults to the run's, as `use_posterior_samples`."""
    post = load_posterior(run, run_dir)
    seed = run.config.seed if seed is None else seed
    return lambda batches: post.member_logits(batches, samples, seed=seed, scale=scale,
                                              member_chunk_size=member_chunk_size)[0]


def evaluate_samples(run: Any, run_dir: str, samples: int, member_chunk_size: int | None = None,
                     seed: int | None = None, scale: float = 1.0) -> dict[str, Any]:
    """Test (+ OOD) metrics of K draws per member, as `runner.test` reports them for the trained members, plus
    what `use_posterior_samples` records. `member_chunk_size`: that many sampled members per pass (see above)."""
    from lora_ensemble.app.runner import make_trainer, test

    if member_chunk_size is None:
        info = use_posterior_samples(run, run_dir, samples, seed, scale)
        return {**test(run, make_trainer(run.config, None)), **info}
    from lora_ensemble.metrics import evaluate

    post = load_posterior(run, run_dir)
    seed = run.config.seed if seed is None else seed
    start = time.perf_counter()
    logits, labels = post.member_logits(run.loader("test"), samples, seed=seed, scale=scale,
                                        member_chunk_size=member_chunk_size)
    ood_loader = run.loader("ood")
    ood = None if ood_loader is None else post.member_logits(ood_loader, samples, seed=seed, scale=scale,
                                                             member_chunk_size=member_chunk_size)[0]
    elapsed = time.perf_counter() - start
    t = run.module.temperature
    metrics = evaluate(logits / t, labels, None if ood is None else ood / t, n_bins=run.module.n_bins)
    run.module.last_outputs["test"] = (logits / t, labels, None if ood is None else ood / t)
    n = logits.shape[1] + (0 if ood is None else ood.shape[1])
    return {"metrics": metrics, "inference_time_per_sample_s": elapsed / max(1, n), "temperature": t,
            **_info(post, samples, seed, scale), "member_chunk_size": member_chunk_size}
