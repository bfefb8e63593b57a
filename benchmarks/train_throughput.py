"""Training throughput: fp32 against bf16, is the full step close to the limit, what does telemetry cost?

For each model and each precision (``fp32``, ``bf16`` autocast), at one batch size, in one process:

* ``full``: ``Trainer.train_epoch``'s training images/s — device loader, on-device augmentation,
  forward, backward, optimizer, telemetry (validation excluded, as the epochs table does);
* ``no telemetry``: the same epoch with the per-step gradient statistics switched off;
* ``bare``: forward + backward + optimizer step on one fixed batch already on the device — the
  limit any input pipeline can reach;
* ``per-sample``: the source reports' pipeline — a per-image Dataset with crop/flip in Python,
  a ``torch.utils.data.DataLoader`` with workers, then the same step.

Each figure is the median of ``--repeats`` timed epochs after a warm-up; the epochs with and
without telemetry alternate. After each model, the ratio bf16 / fp32 of the full step.
Targets on a 2-core CPU: full >= 0.90 x bare, telemetry overhead <= 3%, bf16 >= 1.5 x fp32 for
the conditioned CNN on a CPU with native bf16.

    python benchmarks/train_throughput.py [--models small_cnn conditioned_cnn] [--precisions fp32 bf16]
        [--images 6400] [--repeats 5] [--skip-per-sample] [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from tune_cifar.config import TrainConfig
from tune_cifar.data import CifarBatchDataset, load_splits
from tune_cifar.engine import Trainer
from tune_cifar.precision import cpu_has_native_bf16


def median_rate(run: Callable[[], float], repeats: int) -> float:
    run()  # warm-up: allocator, thread pools, cudnn autotune
    return statistics.median(run() for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(trainer: Trainer, steps: int) -> float:
    images, labels = next(iter(trainer.train_loader))
    device = trainer.device
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.forward_loss(images, labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
    synchronize(device)
    return steps * labels.size(0) / (time.perf_counter() - started)


def per_sample_rate(trainer: Trainer, loader: DataLoader) -> float:
    device = trainer.device
    count = 0
    synchronize(device)
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        trainer.train_step(images, labels)  # the full step, as `full` takes it: only the input pipeline differs
        count += labels.size(0)
    synchronize(device)
    return count / (time.perf_counter() - started)


def telemetry_ablation(trainer: Trainer, repeats: int) -> dict[str, float]:
    """Full epochs with and without per-step gradient statistics, interleaved so that drift in
    the machine's speed (turbo, other processes) hits both alike."""
    record_step = trainer.telemetry.record_step
    with_telemetry, without = [], []
    trainer.train_epoch()  # warm-up
    for _ in range(repeats):
        with_telemetry.append(trainer.train_epoch().epoch["images_per_s"])
        trainer.telemetry.record_step = lambda: None  # the ablation
        without.append(trainer.train_epoch().epoch["images_per_s"])
        trainer.telemetry.record_step = record_step
    return {"full": statistics.median(with_telemetry), "no_telemetry": statistics.median(without)}


def measure(model: str, precision: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    splits = load_splits("synthetic", subset=args.images, seed=0)
    config = TrainConfig(model=model, batch_size=args.batch_size, epochs=1000, precision=precision)
    trainer = Trainer(config, splits, device=device, compile=args.compile)
    steps = len(trainer.train_loader)
    rates = telemetry_ablation(trainer, args.repeats)
    rates["bare"] = median_rate(lambda: bare_rate(trainer, steps), args.repeats)
    rates["per_sample"] = math.nan
    if not args.skip_per_sample:
        dataset = CifarBatchDataset(splits.train_x, splits.train_y, augment=True)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
        rates["per_sample"] = median_rate(lambda: per_sample_rate(trainer, loader), args.repeats)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "conditioned_cnn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=6400, help="training images per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--skip-per-sample", action="store_true", help="leave out the per-sample pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as train --compile)")
    args = parser.parse_args()
    device = torch.device(args.device)
    native = "native bf16" if device.type == "cuda" or cpu_has_native_bf16() else "no native bf16"
    print(
        f"device {device} ({native}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, {args.images} synthetic images per epoch, median of {args.repeats}"
        + (", torch.compile" if args.compile else "")
    )
    print(
        f"{'model':<16}{'precision':>10}{'full':>10}{'bare':>10}{'no telem':>10}{'per-sample':>12}"
        f"{'full/bare':>11}{'telemetry':>11}"
    )
    for model in args.models:
        full = {}
        for precision in args.precisions:
            rates = measure(model, precision, args, device)
            full[precision] = rates["full"]
            overhead = rates["no_telemetry"] / rates["full"] - 1
            print(
                f"{model:<16}{precision:>10}{rates['full']:>10.0f}{rates['bare']:>10.0f}{rates['no_telemetry']:>10.0f}"
                f"{rates['per_sample']:>12.0f}{rates['full'] / rates['bare']:>11.3f}{overhead:>+11.1%}",
                flush=True,
            )
        if len(full) == 2:
            print(f"{model:<16}{'bf16/fp32':>10}{full['bf16'] / full['fp32']:>10.2f}x (full step)", flush=True)
    print("images/s; full/bare target >= 0.90, telemetry overhead target <= +3%, bf16/fp32 >= 1.5 (conditioned_cnn)")


if __name__ == "__main__":
    main()
