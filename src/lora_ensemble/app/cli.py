"""The `lora-ensemble` command line.

    lora-ensemble demo                       LoRA-Ensemble vs. single LoRA on the offline default
    lora-ensemble fit --config X.yaml        train one run (Lightning; --resume, multi-device flags)
    lora-ensemble evaluate --checkpoint RUN  test metrics (+ plots) of a finished run
    lora-ensemble evaluate --checkpoint RUN --samples K   the same for K posterior draws per member
    lora-ensemble predict --checkpoint RUN --input FILE   per-sample prediction and uncertainty
    lora-ensemble posterior --checkpoint RUN TFB posterior of a finished run (sigma on its validation split)
    lora-ensemble analyze --checkpoint RUN   do the members reach different modes? (diversity, paths, CKA)
    lora-ensemble compare --config X.yaml --methods a,b --seeds 3
    lora-ensemble benchmark                  speed and memory against the limit and the peers

Mistakes (unknown key, wrong type, missing or damaged file, bad option) print one `error:` line and exit 2,
found before anything is written: a mistake never changes a run folder, and `fit` refuses a folder that holds
a run unless --resume or --overwrite. Output is ours only; `--verbose` adds Lightning's and transformers'
messages and warnings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOISY = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning",
         "transformers", "torch", "timm", "torchvision", "torchmetrics", "huggingface_hub")


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes as one `error:` line (and exit status 2), like every other mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Hide the info messages and warnings of Lightning, transformers and torch while a command runs (unless
    `verbose`); the previous logging levels and warning filters come back afterwards."""
    if verbose:
        yield
        return
    import lightning  # noqa: F401  (sets its own logger level when imported: import it first)

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # installed without transformers (no `demo` / `llm` extra): nothing of it to quiet
        hf_logging = None
    loggers = {name: logging.getLogger(name) for name in NOISY}
    levels = {name: logger.level for name, logger in loggers.items()}
    if hf_logging is not None:
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(%s)(\.|$)" % "|".join(n.replace(".", r"\.") for n in NOISY))
        for logger in loggers.values():
            logger.setLevel(logging.ERROR)
        if hf_logging is not None:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()  # "Loading weights: 100%|..."
        try:
            yield
        finally:
            for name, logger in loggers.items():
                logger.setLevel(levels[name])
            if hf_logging is not None:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (Lightning; override training.* in the config)")
    g.add_argument("--accelerator", help="cpu, gpu, auto ...")
    g.add_argument("--devices", help="number of devices per node, or 'auto'")
    g.add_argument("--strategy", help="auto, ddp, fsdp, ...")
    g.add_argument("--num-nodes", type=int, help="nodes (multi-node: launch with torchrun or SLURM)")
    g.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed ...")


def _device_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("accelerator", "accelerator"), ("devices", "devices"), ("strategy", "strategy"),
                      ("num_nodes", "num_nodes"), ("precision", "precision")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"training.{key}={value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lora-ensemble", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show Lightning's and transformers' info messages and warnings")

    p = sub.add_parser("demo", parents=[common],
                       help="train and compare LoRA-Ensemble and single LoRA on the offline default")
    p.add_argument("--output-dir", default="runs/demo", help="folder for the two runs, the table and the figures "
                                                              "(default: %(default)s)")
    p.add_argument("--members", type=positive_int, default=4, help="ensemble members (default 4)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds): 16 articles, 1 epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch instead)")

    p = sub.add_parser("fit", parents=[common], help="train one run from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>); must be new or empty unless "
                                        "--resume or --overwrite")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/last.ckpt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --output-dir (its results, weights and checkpoints)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values, e.g. training.epochs=1")
    _add_device_flags(p)

    p = sub.add_parser("evaluate", parents=[common], help="test metrics of a finished run")
    p.add_argument("--checkpoint", required=True, help="run folder written by `fit`")
    p.add_argument("--output", help="write the metrics JSON here (default <run>/evaluation.json)")
    p.add_argument("--plots", help="folder for reliability / risk-coverage / OOD figures")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values (e.g. data.*)")
    p.add_argument("--samples", type=positive_int, metavar="K", help="evaluate K draws per member from the run's "
                   "posterior (training.posterior) instead of the trained members (default <run>/evaluation_samples_K.json)")
    p.add_argument("--member-chunk-size", type=positive_int, metavar="N", help="with --samples: run N sampled "
                   "members per pass and concatenate their logits (less memory, the same metrics)")

    p = sub.add_parser("analyze", parents=[common], help="diversity, mode connectivity and representation "
                                                         "similarity of a finished run's members")
    p.add_argument("--checkpoint", required=True, help="run folder written by `fit`")
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="data split (default test)")
    p.add_argument("--output", help="write the analysis JSON here (default <run>/analysis.json)")
    p.add_argument("--plots", help="folder for the disagreement, plane, path and CKA figures")
    p.add_argument("--control", help="weights.safetensors of an earlier snapshot of the same run: the "
                                     "same-member path (the control)")
    p.add_argument("--points", type=positive_int, default=11, help="grid points per path (default 11)")
    p.add_argument("--max-pairs", type=positive_int, default=10, help="member pairs whose path is computed "
                                                                      "(a sample when there are more; default 10)")
    p.add_argument("--path-samples", type=positive_int, default=256, help="samples of the split the paths are "
                                                                          "evaluated on (default 256)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values (e.g. data.*)")

    p = sub.add_parser("predict", parents=[common], help="per-sample prediction, probability and uncertainty")
    p.add_argument("--checkpoint", required=True, help="run folder written by `fit` (its data is not needed)")
    p.add_argument("--input", required=True, help="text: .txt (one per line), .csv (column 'text'), .jsonl; "
                                                  "multiple-choice runs: .jsonl of {question, choices}; "
                                                  "images/audio: a file, a folder, or a .txt list of paths")
    p.add_argument("--output", help="output file (.csv or .jsonl); default: print JSON lines")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")
    p.add_argument("--samples", type=positive_int, metavar="K", help="predict with K draws per member from the "
                   "run's posterior (training.posterior) instead of the trained members")
    p.add_argument("--member-chunk-size", type=positive_int, metavar="N", help="with --samples: run N sampled "
                   "members per pass and concatenate their logits (less memory, the same predictions)")

    p = sub.add_parser("posterior", parents=[common], help="a training-free (TFB) posterior for a finished run, "
                                                           "for evaluate / predict --samples K")
    p.add_argument("--checkpoint", required=True, help="run folder written by `fit` (a LoRA method)")
    p.add_argument("--max-nll-increase", type=float, default=0.003, help="sigma is the largest whose mean "
                   "validation NLL increase per member stays under this (default 0.003)")
    p.add_argument("--overwrite", action="store_true", help="replace the posterior the run already holds")

    p = sub.add_parser("compare", parents=[common], help="train several methods with the same data, budget and seeds")
    p.add_argument("--config", required=True, help="YAML run config, optionally with a compare: section of "
                                                   "per-method overrides (see configs/compare_*.yaml)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--seeds", type=positive_int, default=3, help="runs per method, seeds base+0, base+1, ... "
                                                                 "(default 3)")
    p.add_argument("--output-dir", default="runs/compare", help="folder for every run, the tables and the "
                                                                "figures (default: %(default)s)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override base config values, "
                                                                            "e.g. training.epochs=1")
    p.add_argument("--trials", type=int, default=None, help="tuning trials per method (default: the config's "
                                                            "tuning.trials; 0: no tuning stage)")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by several processes or machines, "
                                                   "e.g. postgresql://user@host/db (default: sqlite in --output-dir)")
    p.add_argument("--jobs", type=positive_int, default=1, help="tuning trials run at a time, each in its own "
                                                                "process (default 1)")

    p = sub.add_parser("benchmark", help="speed and memory of LoRA-Ensemble vs. the limit and the peers")
    try:
        from lora_ensemble.app.benchmark import add_arguments
    except ImportError:  # pragma: no cover - benchmark module is optional for the other commands
        add_arguments = None
    if add_arguments is not None:
        add_arguments(p)
    return parser


ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError)  # ConfigError is a ValueError


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Each checks what it can without Lightning first (a config mistake is reported in
    seconds), then does its work inside `quiet`."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except ERRORS as e:
        message = str(e).strip()
        print(f"error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        return 2


def check_run_dir(run_dir: str, resume: bool, overwrite: bool) -> None:
    """`fit` never damages a run: a folder that holds files is used only with --resume or --overwrite."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it; give one of them")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"--output-dir {run_dir} is a file, not a folder")
    from lora_ensemble.app.launch import launch_rank

    if resume or overwrite or launch_rank() != 0:  # DDP processes > 0 re-run the command after rank 0 wrote
        return
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if entries:
        what = "a finished run" if "results.json" in entries else f"files ({', '.join(entries[:4])})"
        raise ValueError(f"--output-dir {run_dir} already holds {what}; pass --overwrite to replace it, --resume to "
                         "continue it, or choose another folder")


def cmd_demo(args: argparse.Namespace) -> int:
    with quiet(args.verbose):
        from lora_ensemble.app.demo import run_demo

        run_demo(args.output_dir, quick=args.quick, num_members=args.members, progress_bar=not args.no_progress)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from lora_ensemble.app.run_config import load_run_config

    config = load_run_config(args.config, list(args.set) + _device_overrides(args))
    run_dir = args.output_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    check_run_dir(run_dir, args.resume, args.overwrite)
    with quiet(args.verbose):
        from lora_ensemble.app.runner import fit
        from lora_ensemble.app.tables import flat_row, markdown_table

        results, run = fit(config, run_dir, resume=args.resume, overwrite=args.overwrite)
    if run.module.trainer.is_global_zero:
        print(markdown_table({config.method.name: flat_row(results)}))
        print(f"wrote {run_dir}/results.json and {run_dir}/model/")
    return 0


def check_output_paths(args: argparse.Namespace) -> None:
    """--plots must name a folder (or nothing yet) and --output a file, before any work starts."""
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        raise ValueError(f"--plots {args.plots!r} is a file; name a folder for the figures")
    if args.output and os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a folder; name the JSON file to write")


def check_member_chunks(args: argparse.Namespace) -> None:
    """--member-chunk-size splits the sampled members of --samples; alone it would be silently ignored."""
    if args.member_chunk_size is not None and args.samples is None:
        raise ValueError("--member-chunk-size runs the sampled members of --samples K in chunks; it needs --samples")


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_output_paths(args)
    check_member_chunks(args)
    with quiet(args.verbose):
        from lora_ensemble.app.runner import load_run, make_trainer, test
        from lora_ensemble.app.tables import flat_row, markdown_table, write_figures
        from lora_ensemble.io import atomic_write_bytes

        run = load_run(args.checkpoint, args.set)
        name = run.config.method.name
        if args.samples is not None:  # the trained ensemble replaced by K draws per member (app/posterior.py)
            from lora_ensemble.app.posterior import evaluate_samples

            results = evaluate_samples(run, args.checkpoint, args.samples, args.member_chunk_size)
            name = f"{name}+{results['posterior']} x{args.samples}"
        else:
            results = test(run, make_trainer(run.config, None))
        default = f"evaluation_samples_{args.samples}.json" if args.samples is not None else "evaluation.json"
        out = args.output or os.path.join(args.checkpoint, default)
        atomic_write_bytes(out, json.dumps(results, indent=2).encode())
        print(markdown_table({name: flat_row(results)}))
        if args.plots:
            write_figures({name: run.module.last_outputs["test"]}, args.plots)
    print(f"wrote {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    check_output_paths(args)
    from lora_ensemble.app.analyze import check_run_folder

    check_run_folder(args.checkpoint)
    with quiet(args.verbose):
        from lora_ensemble.app.analyze import run_analyze

        run_analyze(args.checkpoint, args.split, args.plots, args.output, args.set, args.control, args.points,
                    args.max_pairs, args.path_samples)
    return 0


def cmd_posterior(args: argparse.Namespace) -> int:
    if not (args.max_nll_increase > 0):  # also NaN
        raise ValueError(f"--max-nll-increase must be a number > 0, got {args.max_nll_increase}")
    with quiet(args.verbose):
        from lora_ensemble.app.posterior import calibrate_tfb
        from lora_ensemble.app.runner import load_run

        run = load_run(args.checkpoint)
        result = calibrate_tfb(run, args.checkpoint, args.max_nll_increase, overwrite=args.overwrite)
    sigma = ", ".join(f"{v:.3g}" for v in result["sigma"])
    print(f"TFB sigma per member {sigma} (validation NLL increase <= {result['max_nll_increase']:g} on "
          f"{result['num_anchor']} samples); wrote {result['path']}/")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lora_ensemble.app.predict import check_output, predict_file

    check_output(args.output)
    check_member_chunks(args)
    with quiet(args.verbose):
        predict_file(args.checkpoint, args.input, args.output, batch_size=args.batch_size, samples=args.samples,
                     member_chunk_size=args.member_chunk_size)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    with quiet(args.verbose):
        from lora_ensemble.app.compare import run_compare

        methods = args.methods.split(",") if args.methods else None
        run_compare(args.config, methods, args.seeds, args.output_dir, overrides=args.set, trials=args.trials,
                    storage=args.storage, jobs=args.jobs)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from lora_ensemble.app.benchmark import run_from_args

    run_from_args(args)
    return 0


COMMANDS = {"demo": cmd_demo, "fit": cmd_fit, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "compare": cmd_compare, "benchmark": cmd_benchmark, "analyze": cmd_analyze,
            "posterior": cmd_posterior}

if __name__ == "__main__":
    sys.exit(main())
