"""Does bf16 autocast train as well as float32? The same configuration over seeds, in both precisions.

For each seed, one run in fp32 and one in bf16 (alternating which goes first, so drift in the
machine's speed hits both alike), each for ``--epochs`` epochs on the same split, then the
final validation accuracy (the test set is not touched) and the training images/s. Prints
every run, then per precision the mean ± sample standard deviation, whether the bf16 mean
lies within the fp32 mean ± one fp32 standard deviation, and the speed ratio.

    python benchmarks/precision_parity.py --config search_spaces/small_cnn.yaml --epochs 5 \\
        --data cifar10 --data-dir DIR [--subset N] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tune_cifar.data import load_splits
from tune_cifar.engine import Trainer
from tune_cifar.spaces import load_config_file

PRECISIONS = ("fp32", "bf16")


def run(config, splits) -> dict[str, float]:
    trainer = Trainer(config, splits)
    started = time.perf_counter()
    rates = [trainer.train_epoch().epoch["images_per_s"] for _ in range(config.epochs)]
    return {
        "val_acc": trainer.history[-1]["val_acc"],
        "images_per_s": statistics.median(rates),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a training config (or a space file that fixes every key)")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=("synthetic", "cifar10"), default="synthetic")
    parser.add_argument("--data-dir")
    parser.add_argument("--subset", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config_file(args.config).replace(epochs=args.epochs)
    splits = load_splits(args.data, data_dir=args.data_dir, subset=args.subset, seed=0)
    print(
        f"{args.config}: {base.model}, {args.epochs} epochs x {len(splits.train_y):,} train images "
        f"({splits.source}), validated on {len(splits.val_y):,}; seeds {args.seeds}; {args.threads} threads, "
        f"torch {torch.__version__}",
        flush=True,
    )
    results: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for i, seed in enumerate(args.seeds):
        for precision in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
            result = run(base.replace(seed=seed, precision=precision), splits)
            results[precision].append(result)
            print(
                f"seed {seed} {precision}: val acc {result['val_acc']:.2%}  {result['images_per_s']:.0f} img/s  "
                f"{result['seconds']:.0f} s",
                flush=True,
            )
    summary = {}
    for precision, runs in results.items():
        accs = [r["val_acc"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        speed = statistics.median(r["images_per_s"] for r in runs)
        summary[precision] = (statistics.mean(accs), std, speed)
        print(f"{precision}: val acc {statistics.mean(accs):.2%} ± {100 * std:.2f} (n={len(accs)})  {speed:.0f} img/s")
    (fp32_mean, fp32_std, fp32_speed), (bf16_mean, _, bf16_speed) = summary["fp32"], summary["bf16"]
    within = abs(bf16_mean - fp32_mean) <= fp32_std
    print(
        f"bf16 - fp32: {100 * (bf16_mean - fp32_mean):+.2f} points, "
        f"{'within' if within else 'OUTSIDE'} the fp32 seed spread (±{100 * fp32_std:.2f}); "
        f"speed bf16/fp32 {bf16_speed / fp32_speed:.2f}x"
    )


if __name__ == "__main__":
    main()
