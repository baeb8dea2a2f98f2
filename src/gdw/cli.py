"""The ``gdw`` command: ``train``, ``compare``, ``demo``, ``detect``.

A user mistake (unknown method, bad value, missing file, existing run
directory) prints one line and exits with code 2; a run whose loss becomes
non-finite exits with code 1 and keeps its last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import UserError
from .config import load_config_file, parse_method_args, parse_value  # noqa: F401 - re-exported
from .train import NEUTRAL, RunInterrupted, TrainConfig, TrainingDiverged

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit code 2), like gdw's own."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


GRID_FLAGS = {  # gdw compare: settings that take a list, one cell per value
    "noise": ("--noise", "comma-separated noise specs (default none)"),
    "imbalance": ("--imbalance", "comma-separated imbalance specs (default none)"),
    "method": ("--methods", "comma-separated methods; NAME-head means NAME with --head-only (default ce,mwnet,gdw)"),
    "seed": ("--seeds", "comma-separated seeds (default 0)"),
}


def _flag_options(f: dataclasses.Field) -> tuple[str, dict]:
    """The flag of a :class:`TrainConfig` field and its ``argparse`` options,
    from the field's type, default and ``setting`` metadata."""
    opts = {k: v for k, v in f.metadata.items() if k != "flag"}
    name = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    kind = str(f.type)
    if "bool" in kind:
        return name, {**opts, "dest": f.name, "default": None,
                      "action": "store_false" if name.startswith("--no-") else "store_true"}
    if "type" not in opts and ("int" in kind or "float" in kind):
        opts["type"] = int if "int" in kind else float
    if f.default is not dataclasses.MISSING and f.default is not None and "(default" not in opts["help"]:
        opts["help"] += f" (default {f.default})"
    return name, opts


def _add_train_flags(p: argparse.ArgumentParser, grid: bool = False) -> None:
    """``--config``, a flag per :class:`TrainConfig` field that has help text (a list of values for the
    settings of :data:`GRID_FLAGS` with ``grid``), and the flags of the process (``--nproc``, ``--threads``)."""
    p.add_argument("--config", help="TOML or YAML file of settings; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata or (grid and f.name == "resume"):
            continue
        if grid and f.name in GRID_FLAGS:
            flag, text = GRID_FLAGS[f.name]
            p.add_argument(flag, help=text)
            continue
        flag, opts = _flag_options(f)
        p.add_argument(flag, **opts)
    if grid:
        p.add_argument("--force", action="store_true", default=None, help="rerun cells whose saved settings differ "
                       "from the requested ones (their results are replaced)")
    else:
        p.add_argument("--nproc", type=int,
                       help="data-parallel processes on this machine (launches torchrun; one per GPU)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (default: torch's own choice; on a "
                                                            "busy or shared machine, 1 is often much faster)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="gdw", description="Train classifiers on noisy, imbalanced labels by data weighting.")
    parser.add_argument("--version", action="version", version=f"gdw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train one model and write a run directory")
    _add_train_flags(t)
    c = sub.add_parser("compare", help="run a grid of methods × settings × seeds and tabulate it")
    _add_train_flags(c, grid=True)
    sub.add_parser("demo", help="CE vs MW-Net vs GDW on scikit-learn's digits with 40%% uniform noise, on one CPU "
                                "thread so that every machine prints the same numbers (about 15 s)")
    _add_detect_flags(sub.add_parser("detect", help="rank a run's training labels from most to least likely wrong"))
    p = sub.add_parser("predict", help="predict new data with a trained run (best.pt when present)")
    p.description = ("Predict the classes of new data with the model of a finished run and the run's own "
                     "preprocessing; writes one row per example. If the data carries labels, prints the accuracy.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a gdw train run directory")
    p.add_argument("--data", required=True, help="csv:PATH (label column optional; the text column of a text "
                   "run), folder:PATH (class "
                   "sub-folders, or images directly in it) or npz:PATH (x, optional y)")
    p.add_argument("--out", required=True, help="the CSV file to write")
    p.add_argument("--label-column", help="the column of a CSV that holds its labels, to measure the accuracy "
                   "against (default: the run's label column; without it the data is read as unlabelled)")
    p.add_argument("--model-file", choices=("best", "final"), help="best.pt (the epoch chosen on validation) or "
                   "the final model (default: best.pt only when its validation accuracy beats the final model's by "
                   "more than twice its standard error)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (default: torch's own choice)")
    return parser


def resolve_config(args: argparse.Namespace, exclude=()) -> dict:
    """Defaults < --config file < flags given on the command line."""
    settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    settings.update({key: value for key, value in vars(args).items()
                     if key not in ("config", "command", "argv", *exclude) and value is not None})
    if isinstance(settings.get("method_args"), str):
        settings["method_args"] = parse_method_args(settings["method_args"])
    unknown = sorted(set(settings) - set(FIELDS) - set(exclude))
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(unknown)}")
    return settings


def resume_config(settings: dict) -> TrainConfig:
    """The config of ``gdw train --out R --resume [flags]``: the settings saved
    in R; a flag that would change the result must equal its saved value."""
    if not settings.get("out"):
        raise UserError("--resume needs --out RUN_DIR, the run to continue")
    saved, changes = TrainConfig.load(settings["out"]).with_recorded_params()
    if changes:  # a default changed since the run started: it goes on with its own
        print(f"gdw train: resuming with the run's own method parameters: {'; '.join(changes)}", file=sys.stderr)
    neutral = {k: settings.get(k, getattr(TrainConfig(), k)) for k in NEUTRAL}
    if "method_args" in settings:  # compared by their effect on the run's own parameters
        settings = {**settings, "method_args": {**saved.method_args, **settings["method_args"]}}
    given = TrainConfig(**{**dataclasses.asdict(saved), **settings}).validate()
    diff = given.first_difference(saved, only=set(settings))
    if diff:
        from .train import describe_difference

        raise UserError(describe_difference(diff, f"the run in {settings['out']}"))
    return dataclasses.replace(saved, **{**neutral, "resume": True})


def cmd_train(args) -> int:
    from .distributed import launched_by_torchrun
    from .train import train

    settings = resolve_config(args, exclude=("nproc",))
    cfg = resume_config(settings) if settings.get("resume") else TrainConfig(**settings)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and not launched_by_torchrun():
        from .train import check_run_dir

        check_run_dir(cfg.validate())  # the usual mistakes, before starting N processes
        return launch_torchrun(args.nproc, args.argv)
    train(cfg)
    return 0


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this ``gdw train`` command under ``torchrun --standalone``."""
    import subprocess

    rest = [a for i, a in enumerate(argv)  # without --nproc N / --nproc=N
            if a != "--nproc" and not a.startswith("--nproc=") and (i == 0 or argv[i - 1] != "--nproc")]
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(nproc), "-m", "gdw", *rest])


def _split_list(value, default):
    if value is None:
        return list(default)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def cmd_compare(args) -> int:
    from .compare import compare

    settings = resolve_config(args, exclude=("methods", "seeds", "noise", "imbalance", "force"))
    grid = {k: settings.pop(k, None) for k in ("methods", "seeds", "noise", "imbalance")}
    grid.update({k: getattr(args, k) for k in grid if getattr(args, k) is not None})  # flags override the file
    try:
        seeds = [int(s) for s in _split_list(grid["seeds"], ["0"])]
    except ValueError:
        raise UserError(f"--seeds must be whole numbers separated by commas, got {grid['seeds']!r}") from None
    noises = _split_list(grid["noise"], ["none"])
    imbalances = _split_list(grid["imbalance"], ["none"])
    compare(TrainConfig(**settings), methods=_split_list(grid["methods"], ["ce", "mwnet", "gdw"]),
            settings=[(n, i) for n in noises for i in imbalances], seeds=seeds,
            out=settings.get("out") or "runs/compare", force=bool(args.force))
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    result = predict(args.run_dir, args.data, args.out, model_file=args.model_file, device=args.device,
                     label_column=args.label_column)
    print(f"gdw predict: {result['n']} examples of {args.data} with {result['model_file']} of {args.run_dir} "
          f"({result['why']}) → {args.out}")
    if result["unfinished"]:
        print(f"gdw predict: warning: the run is unfinished ({result['unfinished'][0]} of {result['unfinished'][1]} "
              f"epochs trained): continue it with gdw train --out {args.run_dir} --resume")
    if result["accuracy"] is not None:
        print(f"accuracy against the labels in the data: {100 * result['accuracy']:.2f}% "
              f"({result['n_labelled']} labelled examples)")
    return 0


def cmd_demo(args) -> int:
    import time

    import torch

    from .compare import compare

    torch.set_num_threads(1)  # sums in one order: the same numbers on every CPU, and fast on a busy one
    out = Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(TrainConfig(dataset="digits", model="mlp", epochs=30, meta_per_class=10, meta_batch_size=100,
                        progress=False),
            methods=["ce", "mwnet", "gdw"], settings=[("uniform:0.4", "none")], seeds=[0], out=str(out), quiet=True)
    return 0


DETECT_ONLY = ("run_dir", "top", "num_issues", "format", "output", "ranked", "export", "relabel", "nproc", "folds")


def _add_detect_flags(p: argparse.ArgumentParser) -> None:
    p.description = ("Print the training examples whose labels a run distrusts most (from its label_issues.csv) "
                     "and, when the true labels are known, how well the ranking finds the mislabelled ones. "
                     "Without RUN_DIR, first trains with the flags of gdw train.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished gdw train run directory")
    p.add_argument("--top", type=int, default=20, help="rows of the table to print (default 20)")
    p.add_argument("--num-issues", type=int, help="how many examples to flag (default: the run's estimate, "
                   "the examples whose suggested label differs from the given one)")
    p.add_argument("--format", choices=("table", "cleanlab"), default="table",
                   help="cleanlab: also write --output FILE.npy as cleanlab.filter.find_label_issues returns it")
    p.add_argument("--output", help="the .npy file of --format cleanlab")
    p.add_argument("--ranked", action="store_true", help="--format cleanlab: the flagged positions ranked by "
                   "severity (like return_indices_ranked_by=...) instead of a boolean mask")
    p.add_argument("--folds", type=int, metavar="N", help="train N runs, each leaving one fold of the training "
                   "rows out, so every row is scored by a model that did not train on it (N trainings)")
    p.add_argument("--export", metavar="FILE", help="write the run's data (csv, npz) without the flagged rows, "
                   "or for an image folder a CSV list of them")
    p.add_argument("--relabel", action="store_true", help="--export: keep the flagged rows with their suggested "
                   "labels (for a folder: the moves to make)")
    _add_train_flags(p)


def _print_issues(run: Path, issues, args) -> None:
    """gdw detect's report: the table, the estimate, the flagged count, and the metrics when true labels are known."""
    from .detect import describe_pairs, evaluate, format_table

    flagged = issues.num_flagged if args.num_issues is None else args.num_issues
    print(f"gdw detect: {run} ({issues.method}, {len(issues)} training examples, score: {issues.score_name})")
    print(format_table(issues, args.top))
    if issues.noise_rate is not None:
        lo, hi = issues.noise_interval
        print(f"estimated wrong labels: {100 * issues.noise_rate:.1f}% of the training examples "
              f"(bootstrap interval {100 * lo:.1f}–{100 * hi:.1f}%, the noise of sampling the rows)"
              + describe_pairs(issues))
        if issues.noise_caveat:
            print(f"caution: {issues.noise_caveat}")
    how = "--num-issues" if args.num_issues is not None else "suggested label differs from the given one"
    print(f"flagged as label issues: {min(flagged, len(issues))} of {len(issues)} ({how})")
    m = evaluate(issues, args.num_issues)
    if m is None:
        print("true labels unknown: no precision / recall / AUROC")
        return
    k = m["n_noisy"]
    print(f"against the true labels ({k} of {m['n']} mislabelled): AUROC {m['auroc']:.4f}, "
          f"precision@{k} {m['precision_at_k']:.4f}, recall@{k} {m['recall_at_k']:.4f}")
    print(f"flagged {m['num_flagged']}: precision {m['precision_flagged']:.4f}, recall {m['recall_flagged']:.4f}; "
          f"suggested label = true label for {100 * m['suggestion_accuracy']:.1f}% of the flagged mislabelled examples")


def cmd_detect(args) -> int:
    import numpy as np

    from .detect import load_issues, to_cleanlab

    if args.top < 0:
        raise UserError(f"--top must be >= 0, got {args.top}")
    if args.relabel and not args.export:
        raise UserError("--relabel goes with --export FILE")
    if args.num_issues is not None and args.num_issues < 0:
        raise UserError(f"--num-issues must be >= 0, got {args.num_issues}")
    if args.format == "cleanlab" and not args.output:
        raise UserError("--format cleanlab needs --output FILE.npy")
    if args.format != "cleanlab" and (args.output or args.ranked):
        raise UserError("--output and --ranked go with --format cleanlab")
    settings = resolve_config(args, exclude=DETECT_ONLY)
    if args.folds is not None:  # cross-fitted label issues (gdw.crossfit)
        if args.run_dir is not None or args.export or args.format == "cleanlab":
            raise UserError("--folds trains its own runs: give the training flags, not RUN_DIR, --export or --format")
        from .crossfit import detect_folds

        return detect_folds(TrainConfig(**settings), args.folds)
    if args.run_dir is not None:
        if settings or args.nproc is not None:
            given = sorted(settings) + (["nproc"] if args.nproc is not None else [])
            raise UserError("give either RUN_DIR or the training flags, not both "
                            f"(got {', '.join('--' + k.replace('_', '-') for k in given)})")
        run = Path(args.run_dir)
    else:
        if args.nproc is not None and args.nproc > 1:
            raise UserError("gdw detect trains in one process; train with gdw train --nproc, "
                            "then run gdw detect RUN_DIR")
        from .train import default_out, train

        cfg = TrainConfig(**settings)
        cfg.out = cfg.out or str(default_out(cfg))
        train(cfg)
        run = Path(cfg.out)
    issues = load_issues(run)
    _print_issues(run, issues, args)
    if args.export:
        from .export import export

        done = export(run, args.export, relabel=args.relabel, num_issues=args.num_issues)
        what = ("moves to make" if args.relabel else "images to remove") if done["kind"] == "folder" else (
            f"rows ({done['flagged']} flagged " + ("relabelled)" if args.relabel else "left out)"))
        print(f"wrote {done['out']}: {done['written']} {what}, from {done['source']}")
    if args.format == "cleanlab":
        result = to_cleanlab(issues, args.num_issues, ranked=args.ranked)
        out = Path(args.output)
        try:
            np.save(out, result)
        except OSError as err:
            raise UserError(f"--output: cannot write {out}: {err.strerror}") from None
        what = "ranked positions" if args.ranked else "boolean mask"
        print(f"wrote {out if out.suffix == '.npy' else str(out) + '.npy'}: {what} over the {len(issues)} training "
              f"examples in split.npz order ({int(result.sum()) if not args.ranked else len(result)} issues)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    threads = vars(args).pop("threads", None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    from .distributed import rank

    def report(message):  # under torchrun, rank 0 alone reports what every rank saw
        if rank() == 0:
            print(message, file=sys.stderr)

    try:
        return {"train": cmd_train, "compare": cmd_compare, "demo": cmd_demo, "detect": cmd_detect,
                "predict": cmd_predict}[args.command](args)
    except UserError as err:
        report(f"gdw {args.command}: error: {err}")
        return 2
    except (TrainingDiverged, RunInterrupted) as err:
        report(f"gdw {args.command}: {err}")
        return 1 if isinstance(err, TrainingDiverged) else 130
    except KeyboardInterrupt:
        report(f"gdw {args.command}: interrupted before training started; nothing was written")
        return 130
    except BrokenPipeError:  # e.g. gdw detect RUN | head: the reader has gone, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
