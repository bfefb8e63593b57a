"""Train one configuration without Ray: ``python -m tune_cifar.train --config FILE``.

Validates on the validation split every epoch, evaluates the test set once at the end, and
writes the same Parquet tables a study trial writes (``trials``, ``epochs``, ``layers``, and
``steps`` when probing) plus the final weights, so analysis treats a single run like a study
of one trial.

``--seeds N`` repeats the run with N consecutive seeds into the same folder (one ``trials`` row
per seed, trial ids ``seed0``, ``seed1``, ...) and prints the mean ± standard deviation; with
``--train-on-val`` and ``--from-study STUDY`` it is the final retrain of a study's best
configuration, tested once per seed.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.data import Splits, load_splits
from tune_cifar.engine import Trainer
from tune_cifar.errors import UsageError, os_reason
from tune_cifar.outcome import Outcome
from tune_cifar.plan import StudyPlan
from tune_cifar.spaces import load_config_file
from tune_cifar.tables import TableWriter, finished_trials, read_table, write_atomic_bytes

EXIT_WRITE_FAILED = 3  # its results could not be written (a full disk); what was written is whole
EXIT_DIVERGED = 4  # a run's training loss became NaN or infinite (it stopped there; its rows are kept)


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python -m tune_cifar.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML of vocabulary keys, or a search-space file of fixed values only")
    parser.add_argument(
        "--from-study",
        metavar="STUDY",
        help="train the best finished trial's configuration of a study folder, on the study's data settings",
    )
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one vocabulary key of the config (repeatable; e.g. --set filters=32,64,128)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="train N times with seeds SEED, SEED+1, ... into one folder (default 1)"
    )
    parser.add_argument("--seed", type=int, help="override the config's seed (model init, data order, split)")
    parser.add_argument(
        "--precision",
        choices=cfg.PRECISIONS,
        help="override the config's precision: auto (the fastest, measured and cached), fp32, bf16",
    )
    parser.add_argument(
        "--data", choices=("synthetic", "cifar10"), help="dataset (default synthetic, or the --from-study study's)"
    )
    parser.add_argument("--data-dir", help="folder holding (or receiving) cifar-10-batches-py/")
    parser.add_argument(
        "--data-seed",
        type=int,
        help="seed of the split and synthetic images (default 0, or the --from-study study's --seed)",
    )
    parser.add_argument("--subset", type=int, help="train on a stratified sample of N training images")
    parser.add_argument(
        "--full-test", action="store_true", help="with --subset: still evaluate on every test image (for retrains)"
    )
    parser.add_argument("--val-size", type=int, help="validation images out of the training pool (default: a tenth)")
    parser.add_argument(
        "--train-on-val", action="store_true", help="final retrain: add the validation split to training"
    )
    parser.add_argument("--out", help="results folder (default runs/<time>); must not hold results already")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} asked for, but torch sees no CUDA GPU")
    return device


def merge_validation(splits: Splits) -> Splits:
    """Train on train + validation; the validation split becomes empty (no model selection left)."""
    empty_x, empty_y = splits.val_x[:0], splits.val_y[:0]
    return Splits(
        train_x=np.concatenate([splits.train_x, splits.val_x]),
        train_y=np.concatenate([splits.train_y, splits.val_y]),
        val_x=empty_x,
        val_y=empty_y,
        test_x=splits.test_x,
        test_y=splits.test_y,
        source=splits.source,
    )


def prepare_out(path: str | None) -> Path:
    out = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; choose a new folder")
    cli.require_writable(out, "--out")
    return out


class StepProgress:
    """Progress inside an epoch on a terminal (an epoch of CIFAR-10 on a CPU takes minutes): one
    line rewritten in place on stderr, images/s and the epoch's ETA, at most twice a second.
    Not a terminal (a log file, CI): silent, the one line per epoch says it all."""

    def __init__(self, epoch: int, epochs: int, batch_size: int, interval_s: float = 0.5):
        self.prefix = f"epoch {epoch:>3}/{epochs}"
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.enabled = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.shown = 0.0

    def __call__(self, step: int, steps: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.shown < self.interval_s and step < steps):
            return
        self.shown = now
        elapsed = now - self.started
        rate = step * self.batch_size / elapsed if elapsed > 0 else 0.0
        eta = (steps - step) * elapsed / step
        line = f"{self.prefix}  step {step}/{steps}  {rate:.0f} img/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        sys.stderr.write(f"\r{line}\033[K" if step < steps else "\r\033[K")  # cleared: the epoch's line follows
        sys.stderr.flush()


def progress_line(row: dict[str, Any], epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2%}" if row["val_acc"] is not None else "val -"
    lr = f"{row['lr']:.2e}" if row["lr"] == row["lr_last"] else f"{row['lr']:.2e}->{row['lr_last']:.2e}"
    return (
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%}  {val}"
        f"  lr {lr}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config, data = resolve_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    device = resolve_device(args.device)
    out = prepare_out(args.out)
    splits = load_splits(data["data"], data_dir=data["data_dir"], val_size=data["val_size"], subset=data["subset"],
                         seed=data["seed"], full_test=args.full_test)  # fmt: skip
    if args.train_on_val:
        splits = merge_validation(splits)
    seeds = [config.seed + i for i in range(args.seeds)]
    try:
        results = [
            train_one(config.replace(seed=seed), splits, device, args.compile, out, repeated=len(seeds) > 1)
            for seed in seeds
        ]
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(config) | {"filters": list(config.filters)}))
    except OSError as exc:  # a full disk, a quota: every file written so far is whole (atomic writes)
        print(f"error: cannot write the run's results in {out}: {os_reason(exc)}; what was written is whole",
              file=sys.stderr)  # fmt: skip
        return EXIT_WRITE_FAILED
    trained = [row for row in results if row["status"] != Outcome.DIVERGED.status]
    lost = len(results) - len(trained)
    if len(results) > 1 and trained:
        left_out = f" ({lost} of {len(results)} seeds diverged, left out)" if lost else ""
        print(seed_summary(trained, f"test acc (the test set once per seed){left_out}", "test_acc"))
        if trained[0]["best_val_acc"] is not None:
            print(seed_summary(trained, f"best val acc{left_out}", "best_val_acc"))
    if lost:
        print(f"diverged: {lost} of {len(results)} runs; their rows in {out}/trials have status DIVERGED")
        return EXIT_DIVERGED
    return 0


def resolve_config(args: Any) -> tuple[cfg.TrainConfig, dict[str, Any]]:
    """The configuration to train and its data settings: ``--from-study``'s best trial (with the
    study's data flags) or ``--config``; command-line flags override either."""
    data: dict[str, Any] = {"data": "synthetic", "data_dir": None, "val_size": None, "subset": None, "seed": 0}
    if args.from_study:
        if args.config:
            raise UsageError("--config and --from-study both name a configuration; give one")
        config, data = best_of_study(Path(args.from_study))
    else:
        config = load_config_file(args.config) if args.config else cfg.TrainConfig()
    given = {
        "data": args.data,
        "data_dir": args.data_dir,
        "val_size": args.val_size,
        "subset": args.subset,
        "seed": args.data_seed,
    }
    data |= {key: value for key, value in given.items() if value is not None}
    flags = {"epochs": args.epochs, "seed": args.seed, "precision": args.precision}
    overrides = cfg.parse_assignments(args.set or []) | {key: v for key, v in flags.items() if v is not None}
    return (config.replace(**overrides) if overrides else config), data


def best_of_study(folder: Path) -> tuple[cfg.TrainConfig, dict[str, Any]]:
    """The best finished trial's configuration (``tables.finished_trials``) and the study's data flags."""
    if not (folder / "trials").is_dir():
        raise UsageError(f"--from-study {folder}: not a study folder (no trials/ table)")
    ranked = finished_trials(read_table(folder, "trials"))
    if ranked.empty:
        raise UsageError(f"--from-study {folder}: no finished trial to take the configuration from")
    best = ranked.iloc[0]
    plan = StudyPlan.load_if_any(folder)  # None for a single run's folder: its data settings are the row's
    data = {
        "data": plan.data if plan else str(best["data"]),
        "data_dir": plan.data_dir if plan else None,
        "val_size": plan.val_size if plan else None,
        "subset": plan.subset if plan else None,
        "seed": plan.seed if plan else 0,  # the study's split: the retrain sees the same images
    }
    print(f"best trial of {folder}: {best['trial_id']} ({best['best_val_acc']:.2%} validation accuracy)")
    return cfg.from_row(best.to_dict()), data


def train_one(
    config: cfg.TrainConfig, splits: Splits, device: torch.device, compile: bool, out: Path, repeated: bool
) -> dict[str, Any]:
    """Train one seed to the end, test once, and write its rows (trial id ``seedN`` when repeated)."""
    trainer = Trainer(config, splits, device=device, compile=compile)
    trial_id = f"seed{config.seed}" if repeated else out.name
    tables = TableWriter.open(out)
    record = tables.record(trial_id)
    trial = {"study": None, **cfg.to_row(config), **Outcome.RUNNING.columns()}
    print(
        f"training {config.model} ({trainer.params:,} parameters, {trainer.macs:,} MACs) on {splits.source}: "
        f"{len(splits.train_y):,} train / {len(splits.val_y):,} val / {len(splits.test_y):,} test images, {device}, "
        f"{trainer.computing.describe()}, seed {config.seed}"
    )
    started = time.perf_counter()
    while trainer.epoch < config.epochs and not trainer.diverged:
        report = trainer.train_epoch(on_step=StepProgress(trainer.epoch + 1, config.epochs, config.batch_size))
        print(progress_line(report.epoch, config.epochs), flush=True)
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.add("steps", report.steps)
        record.trial = {**trial, **trainer.summary(), "wall_s": time.perf_counter() - started}
        tables.write()
    if trainer.diverged:  # stopped at that epoch; a diverged model is not tested
        wall_s = time.perf_counter() - started
        record.trial = {**trial, **trainer.summary(), **Outcome.DIVERGED.columns(), "wall_s": wall_s}
        tables.compact()
        loss = trainer.history[-1]["train_loss"]
        print(f"diverged: training loss {loss} in epoch {trainer.epoch}; stopped there, not tested -> {out}")
        return record.trial
    summary = trainer.finish()
    test = trainer.evaluate_test()
    wall_s = time.perf_counter() - started
    record.trial = {**trial, **summary, **test, **Outcome.COMPLETED.columns(), "wall_s": wall_s}
    tables.compact()
    weights = out / (f"model_{trial_id}.pt" if repeated else "model.pt")
    serialised = io.BytesIO()  # in memory first: torch.save on a full disk fails as a RuntimeError mid-file
    torch.save(trainer.final_model().state_dict(), serialised)
    write_atomic_bytes(weights, serialised.getvalue())
    best = (
        f"{summary['best_val_acc']:.2%} (epoch {summary['best_epoch']})" if summary["best_val_acc"] is not None else "-"
    )
    print(f"best val acc {best}  test acc {test['test_acc']:.2%}  -> {out}/{{trials,epochs,layers}}, {weights}")
    return record.trial


def seed_summary(results: list[dict[str, Any]], label: str, key: str) -> str:
    """``test acc 71.20% ± 0.35 (n=3 seeds: 70.9, 71.1, 71.6)``: mean ± sample standard deviation."""
    values = [row[key] for row in results]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    each = ", ".join(f"{100 * value:.2f}" for value in values)
    return f"{label}: {statistics.mean(values):.2%} ± {100 * spread:.2f} (n={len(values)} seeds: {each})"


if __name__ == "__main__":
    cli.run(main)
