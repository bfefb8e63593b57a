"""Trials packed on one device: ``python benchmarks/trial_packing.py --device cuda --trials 4``.

A study packs trials onto a GPU with ``--gpus-per-trial 0.25``: four trainings share it. Does
that pay? In one run, through Ray as a study places trials (one Ray task per trial, the
resources a trial asks for), each trial trains the second report's configuration
(``search_spaces/seed_best.yaml``, or ``--config``) for ``--seconds`` on synthetic CIFAR-shaped
images after a warm-up, with ``Trainer.train_epoch`` (device loader, augmentation, telemetry):

* first one trial alone, then ``--trials`` trials at once, each asking for 1/``--trials`` of the
  device (``num_gpus``), or on a CPU one core each (``--device cpu``);
* printed: images/s of each trial, their sum, and the sum against the single trial.

Goals on a GPU: >= 50k images/s for one trial in bf16; 4 packed >= 2.5x one trial. On this
project's 2-core development machine only the CPU form runs (``--device cpu --trials 2``).

    python benchmarks/trial_packing.py [--device cuda|cpu] [--trials 4] [--seconds 20] [--config FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from tune_cifar import cli
from tune_cifar.errors import UsageError

REPO_SPACE = "search_spaces/seed_best.yaml"


def train_for(config_values: dict[str, Any], device: str, seconds: float, threads: int) -> dict[str, float]:
    """One trial's throughput: whole training epochs until ``seconds`` have passed (after one warm-up epoch)."""
    import torch

    from tune_cifar import config as cfg
    from tune_cifar.data import load_splits
    from tune_cifar.engine import Trainer

    torch.set_num_threads(threads)
    config = cfg.from_values(config_values, source="--config")
    splits = load_splits("synthetic", subset=6000, val_size=1000, seed=config.seed)
    trainer = Trainer(config.replace(epochs=10_000), splits, device=device)
    trainer.train_epoch()  # warm-up: allocator, cuDNN autotune, thread pools
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        rates.append(trainer.train_epoch().epoch["images_per_s"])
    return {"images_per_s": statistics.median(rates), "epochs": len(rates), "precision": trainer.precision}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--trials", type=int, default=4, help="trials packed at once (4: --gpus-per-trial 0.25)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed training per trial, after a warm-up")
    parser.add_argument("--config", default=REPO_SPACE, help="a config or a space file that fixes every key")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.seconds <= 0:
        raise UsageError("--trials must be at least 1 and --seconds positive")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as a local study: no warning, loopback only
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    from tune_cifar import config as cfg
    from tune_cifar.spaces import load_config_file

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    config = cfg.to_dict(load_config_file(args.config))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if args.device == "cuda":
        share = {"num_gpus": 1 / args.trials, "num_cpus": max(1, int(ray.cluster_resources()["CPU"] // args.trials))}
    else:
        share = {"num_cpus": 1}
    threads = int(share["num_cpus"])
    task = ray.remote(train_for)
    alone = ray.get(task.options(**share).remote(config, args.device, args.seconds, threads))
    packed = ray.get([task.options(**share).remote(config, args.device, args.seconds, threads)
                      for _ in range(args.trials)])  # fmt: skip
    ray.shutdown()
    total = sum(result["images_per_s"] for result in packed)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} thread(s) per trial"
    print(f"{args.config}, {alone['precision']}, batch {config['batch_size']}, on {name}, {args.seconds:g} s per trial")
    print(f"one trial alone:        {alone['images_per_s']:>10,.0f} images/s")
    for index, result in enumerate(packed):
        print(f"packed trial {index + 1} of {args.trials}:  {result['images_per_s']:>10,.0f} images/s")
    print(f"{args.trials} packed together:  {total:>10,.0f} images/s = {total / alone['images_per_s']:.2f}x one trial")


if __name__ == "__main__":
    cli.run(main)
