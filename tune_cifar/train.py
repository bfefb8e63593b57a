"""Train one configuration without Ray: ``python -m tune_cifar.train --config FILE``.

Validates on the validation split every epoch, evaluates the test set once at the end, and
writes the same Parquet tables a study trial writes (``trials``, ``epochs``, ``layers``, and
``steps`` when probing) plus the final weights, so analysis treats a single run like a study
of one trial.
"""

from __future__ import annotations

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
from tune_cifar.errors import UsageError
from tune_cifar.spaces import load_config_file
from tune_cifar.tables import TrialRecord


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python -m tune_cifar.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML of vocabulary keys, or a search-space file of fixed values only")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--seed", type=int, help="override the config's seed (model init, data order, split)")
    parser.add_argument(
        "--precision",
        choices=cfg.PRECISIONS,
        help="override the config's precision: auto (bf16 where the device computes it natively), fp32, bf16",
    )
    parser.add_argument(
        "--data", choices=("synthetic", "cifar10"), default="synthetic", help="dataset (default synthetic)"
    )
    parser.add_argument("--data-dir", help="folder holding (or receiving) cifar-10-batches-py/")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the split and synthetic images (default 0)")
    parser.add_argument("--subset", type=int, help="train on a stratified sample of N training images")
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
    return out


def progress_line(row: dict[str, Any], epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2%}" if row["val_acc"] is not None else "val -"
    lr = f"{row['lr']:.2e}" if row["lr"] == row["lr_last"] else f"{row['lr']:.2e}->{row['lr_last']:.2e}"
    return (
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%}  {val}"
        f"  lr {lr}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config_file(args.config) if args.config else cfg.TrainConfig()
    flags = {"epochs": args.epochs, "seed": args.seed, "precision": args.precision}
    overrides = {key: value for key, value in flags.items() if value is not None}
    config = config.replace(**overrides) if overrides else config
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = prepare_out(args.out)
    splits = load_splits(
        args.data, data_dir=args.data_dir, val_size=args.val_size, subset=args.subset, seed=args.data_seed
    )
    if args.train_on_val:
        splits = merge_validation(splits)

    trainer = Trainer(config, splits, device=device, compile=args.compile)
    record = TrialRecord(out.name)
    trial = {"study": None, **cfg.to_row(config), "status": "RUNNING", "stop_reason": None}
    print(
        f"training {config.model} ({trainer.params:,} parameters, {trainer.macs:,} MACs) on {splits.source}: "
        f"{len(splits.train_y):,} train / {len(splits.val_y):,} val / {len(splits.test_y):,} test images, {device}, "
        f"{trainer.precision}"
    )
    started = time.perf_counter()
    while trainer.epoch < config.epochs:
        report = trainer.train_epoch()
        print(progress_line(report.epoch, config.epochs), flush=True)
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.add("steps", report.steps)
        record.trial = {**trial, **trainer.summary(), "wall_s": time.perf_counter() - started}
        record.write(out)
    summary = trainer.finish()
    test = trainer.evaluate_test()
    record.trial = {**trial, **summary, **test, "status": "TERMINATED", "stop_reason": "completed"}
    record.trial["wall_s"] = time.perf_counter() - started
    record.write(out)
    weights = out / "model.pt"
    torch.save(trainer.final_model().state_dict(), weights.with_suffix(".tmp"))
    weights.with_suffix(".tmp").replace(weights)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(config) | {"filters": list(config.filters)}))
    best = (
        f"{summary['best_val_acc']:.2%} (epoch {summary['best_epoch']})" if summary["best_val_acc"] is not None else "-"
    )
    print(f"best val acc {best}  test acc {test['test_acc']:.2%}  -> {out}/{{trials,epochs,layers}}, {weights}")
    return 0


if __name__ == "__main__":
    cli.run(main)
