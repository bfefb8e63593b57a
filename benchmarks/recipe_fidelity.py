"""Does tune-cifar train a report's recipe as the report's own code did? Side by side, over seeds.

The reports' code, written out here in plain PyTorch (a per-image ``DataLoader`` with random
crop and flip, ``torch.optim.Adam(model.parameters(), ...)``, PyTorch's default init, the loss
as the report wrote it, ``CosineAnnealingLR`` stepped per epoch, ``clip_grad_norm_``), against
``tune_cifar``'s ``Trainer`` on the recipe's config file, plus ablation arms: the config with
some keys changed (``--arm NAME:KEY=VALUE,...``; each recipe brings the init ablation, the
second also weight decay's), and the report's code with its last, smaller batch of each epoch
dropped, as tune-cifar's loader does. Every run uses the same split (``load_splits``, split seed 0), the
same images × epochs, fp32, and its own seed for init, data order and augmentation.

Prints each run (validation accuracy after the last epoch, test accuracy once at the end),
then per arm the mean ± sample standard deviation and the difference to the report's code,
paired by seed. Runs are appended to ``--out`` (JSON lines) as they finish; a second call with
the same ``--out`` skips the runs already there, so a stopped benchmark resumes.

    python benchmarks/recipe_fidelity.py --recipe second --data-dir DIR --epochs 5 \\
        --set filters=32,64,128 --seeds 0 1 2 --out fidelity.jsonl
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.data import CifarBatchDataset, Splits, load_splits
from tune_cifar.engine import Trainer
from tune_cifar.errors import UsageError
from tune_cifar.spaces import load_config_file

RECIPES = {
    # recipe: (its config file, ablation arms: name -> keys changed from the file)
    "first": ("search_spaces/small_cnn.yaml", {"small_cnn:kaiming": {"init": "kaiming"}}),
    "second": (
        "search_spaces/seed_best.yaml",
        {
            "seed_best:kaiming": {"init": "kaiming"},
            "seed_best:decay_weights": {"decay_scope": "weights"},
            # tune-cifar's recipe before the init and decay_scope keys existed
            "seed_best:kaiming+decay_weights": {"init": "kaiming", "decay_scope": "weights"},
        },
    ),
}
REPORT = "report's code"
# The report's code with one thing done as tune-cifar does it: its DataLoader drops the last,
# smaller batch of an epoch (tune-cifar's training loader does, so that batch norm never sees a
# batch of one); with a constant learning rate that batch's noisy full-size Adam step comes last.
REPORT_DROP_LAST = "report's code:drop_last"


# -- the reports' code --------------------------------------------------------------------------
class LabelSmoothingCrossEntropy(nn.Module):
    """The second report's loss: (1 - s) * NLL + s * mean over classes of -log p."""

    def __init__(self, smoothing: float) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
        return ((1 - self.smoothing) * nll + self.smoothing * -log_p.mean(dim=-1)).mean()


def report_network(config: cfg.TrainConfig) -> nn.Module:
    """The report's network with PyTorch's default init: the small CNN, or the conditioned CNN."""
    if config.model == "small_cnn":  # the first report
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
        )  # fmt: skip
    layers: list[nn.Module] = []
    width = 3
    for filters in config.filters:
        layers += [nn.Conv2d(width, filters, 3, padding=1), nn.BatchNorm2d(filters)]
        layers += [nn.LeakyReLU(config.activation_slope), nn.MaxPool2d(2)]
        width = filters
    side = 32 // 2 ** len(config.filters)
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(width * side * side, 512), nn.LeakyReLU(config.activation_slope), nn.Dropout(config.dropout),
        nn.Linear(512, 256), nn.LeakyReLU(config.activation_slope), nn.Dropout(config.dropout),
        nn.Linear(256, 10),
    )  # fmt: skip


def report_loss(config: cfg.TrainConfig) -> nn.Module:
    if config.loss == "label_smoothing":
        return LabelSmoothingCrossEntropy(config.label_smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def accuracy(model: nn.Module, images: Any, labels: Any) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(CifarBatchDataset(images, labels, augment=False), batch_size=1000)
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(labels)


def train_report_code(config: cfg.TrainConfig, splits: Splits, drop_last: bool = False) -> dict[str, float]:
    """The report's training loop over one image at a time, as its code ran it (``drop_last``: the
    one change of :data:`REPORT_DROP_LAST`)."""
    torch.manual_seed(config.seed)
    model = report_network(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.min_lr)
        if config.scheduler == "cosine"
        else None
    )
    loss_fn = report_loss(config)
    train = CifarBatchDataset(splits.train_x, splits.train_y, augment=True, seed=config.seed)
    order = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=config.batch_size, shuffle=True, generator=order, drop_last=drop_last
    )
    for _ in range(config.epochs):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {
        "val_acc": accuracy(model, splits.val_x, splits.val_y),
        "test_acc": accuracy(model, splits.test_x, splits.test_y),
    }


# -- tune-cifar -----------------------------------------------------------------------------------
def train_tune_cifar(config: cfg.TrainConfig, splits: Splits) -> dict[str, float]:
    trainer = Trainer(config, splits)
    for _ in range(config.epochs):
        trainer.train_epoch()
    return {"val_acc": trainer.history[-1]["val_acc"], "test_acc": trainer.evaluate_test()["test_acc"]}


# -- the benchmark -------------------------------------------------------------------------------
def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` (a value holding commas, like filters, belongs in --set)."""
    name, colon, assignments = text.partition(":")
    if not colon or not name or not assignments:
        raise UsageError(f"--arm {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. kaiming:init=kaiming")
    return name, cfg.parse_assignments(assignments.split(","), flag="--arm")


def summarise(runs: list[dict[str, Any]], arms: Sequence[str]) -> None:
    by_arm = {arm: {run["seed"]: run for run in runs if run["arm"] == arm} for arm in arms}
    report = by_arm[REPORT]
    for metric in ("test_acc", "val_acc"):
        print(f"\n{metric} (mean ± sample std over seeds; difference to the report's code, paired by seed):")
        for arm in arms:
            values = [run[metric] for run in by_arm[arm].values()]
            if not values:
                continue
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            line = f"  {arm:<34} {100 * statistics.mean(values):6.2f} ± {100 * std:4.2f}  (n={len(values)})"
            paired = [by_arm[arm][seed][metric] - report[seed][metric] for seed in by_arm[arm] if seed in report]
            if arm != REPORT and paired:
                spread = statistics.stdev(paired) if len(paired) > 1 else float("nan")
                line += f"   {100 * statistics.mean(paired):+6.2f} ± {100 * spread:4.2f} points (n={len(paired)})"
            print(line)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="benchmarks/recipe_fidelity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True, help="first: small_cnn; second: seed_best")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key for every arm")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE,...", help="an extra arm")
    parser.add_argument("--only", nargs="+", metavar="ARM", help="run only these arms (names as printed)")
    parser.add_argument("--data", choices=cfg.DATA_SOURCES, default="cifar10")
    parser.add_argument("--data-dir")
    parser.add_argument("--subset", type=int, help="a stratified sample of N training images (quick checks)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True, help="JSON lines of finished runs; resumed when it exists")
    args = parser.parse_args(argv)
    if args.epochs < 1 or not args.seeds or min(args.seeds) < 0:
        raise UsageError("--epochs must be at least 1 and --seeds non-negative integers")
    config_file, ablations = RECIPES[args.recipe]
    tune_arm = Path(config_file).stem
    base = load_config_file(config_file).replace(
        **cfg.parse_assignments(args.set), epochs=args.epochs, precision="fp32"
    )
    arms: dict[str, dict[str, Any]] = {
        REPORT: {},
        tune_arm: {},
        **ablations,
        REPORT_DROP_LAST: {},
        **dict(map(parse_arm, args.arm)),
    }
    unknown = sorted(set(args.only or ()) - set(arms))
    if unknown:
        raise UsageError(f"--only {unknown[0]!r}: not an arm (arms: {', '.join(arms)})")
    arms = {name: changes for name, changes in arms.items() if not args.only or name in args.only}
    configs = {name: base.replace(**changes) for name, changes in arms.items()}  # refused before any training
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    torch.set_num_threads(args.threads)
    splits = load_splits(args.data, data_dir=args.data_dir, subset=args.subset, seed=0, download=False)
    print(
        f"{config_file} ({', '.join(args.set) or 'as written'}): {args.epochs} epochs x {len(splits.train_y):,} "
        f"train images ({splits.source}), validated on {len(splits.val_y):,}, tested on {len(splits.test_y):,}; "
        f"fp32, seeds {args.seeds}, {args.threads} threads, torch {torch.__version__}; {len(done)} runs in {out}",
        flush=True,
    )
    for seed in args.seeds:  # seed-major: a partial run still compares every arm on the same seeds
        for name, config in configs.items():
            if any(run["arm"] == name and run["seed"] == seed for run in done):
                continue
            started = time.perf_counter()
            if name in (REPORT, REPORT_DROP_LAST):
                trained = train_report_code(config.replace(seed=seed), splits, drop_last=name == REPORT_DROP_LAST)
            else:
                trained = train_tune_cifar(config.replace(seed=seed), splits)
            run = {"arm": name, "seed": seed, **trained}
            run["seconds"] = time.perf_counter() - started
            done.append(run)
            with out.open("a") as stream:  # one whole line per finished run
                stream.write(json.dumps(run) + "\n")
            print(
                f"seed {seed} {name:<34} val {run['val_acc']:.2%}  test {run['test_acc']:.2%}  {run['seconds']:.0f} s",
                flush=True,
            )
    summarise([run for run in done if run["seed"] in args.seeds], list(configs))


if __name__ == "__main__":
    cli.run(main)
