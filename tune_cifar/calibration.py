"""``precision: auto`` decided by measurement: the fastest way this device trains this network.

Two CPUs of this project with the same AVX512-BF16 flag measured opposite answers (bf16 at 0.81×
float32 on an Intel Xeon, ≥ 1.4× on an AMD EPYC), so a feature flag cannot decide; a few training
steps of the trial's own network can. :func:`choose` times forward + backward + an SGD step of
each candidate, round-robin so that load from other trials on the node falls on every candidate
alike, and picks the fastest:

* on a CPU: float32 and (where the CPU has native bf16) bf16 autocast, each with the default
  and the ``channels_last`` memory format (which changes the memory layout, not the arithmetic:
  convolutions compute the same sums, so accuracy parity needs no new benchmark);
* on a GPU: float32 and (where supported) bf16, in ``channels_last`` as before.

The answer is cached per device name, thread count, torch version, network shape and batch size in
``$XDG_CACHE_HOME/tune-cifar/precision.json`` (``~/.cache`` by default), so a node calibrates
once per shape. An explicit ``fp32`` or ``bf16`` is used as given and never measured. The
calibration runs before the trial seeds torch, so a trial trains the same whether it hit the
cache or not.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune_cifar.config import TrainConfig
from tune_cifar.machine import cpu_model
from tune_cifar.precision import autocast, cpu_has_native_bf16, resolve

CACHE_VERSION = 1
TIMED_STEPS = 3  # per candidate, after one warm-up step; the median counts


@dataclass(frozen=True)
class Choice:
    """How a trial computes: its precision, its memory format and why (measured, cached or explicit)."""

    precision: str  # fp32 or bf16
    channels_last: bool
    source: str  # measured, cached, explicit, the only candidate
    rates: dict[str, float] = field(default_factory=dict)  # candidate -> training images per second

    @property
    def label(self) -> str:
        return variant_label(self.precision, self.channels_last)

    def rates_text(self) -> str:
        """``fp32 812, fp32+cl 903, bf16 640, bf16+cl 700 img/s``; empty for an explicit choice."""
        return ", ".join(f"{name} {rate:.0f}" for name, rate in self.rates.items()) + " img/s" if self.rates else ""

    def describe(self) -> str:
        """The start line's words: ``bf16+cl (measured: fp32 812, ... img/s)`` or ``fp32 (explicit)``."""
        return f"{self.label} ({self.source}{': ' + self.rates_text() if self.rates else ''})"


def variant_label(precision: str, channels_last: bool) -> str:
    return precision + ("+cl" if channels_last else "")


def choose(config: TrainConfig, device: torch.device, cache_dir: Path | None = None) -> Choice:
    """The explicit precision as given, else the cached or freshly measured fastest candidate."""
    on_gpu = device.type == "cuda"
    if config.precision != "auto":
        return Choice(resolve(config.precision, device), on_gpu, "explicit")
    candidates = [(precision, layout) for precision in _precisions(device) for layout in _layouts(device)]
    if len(candidates) == 1:  # a GPU without bf16
        return Choice(*candidates[0], "the only candidate")
    path = (cache_dir or default_cache_dir()) / "precision.json"
    key = cache_key(config, device)
    entries = read_cache(path)
    if key in entries:
        entry = entries[key]
        return Choice(entry["precision"], entry["channels_last"], "cached", dict(entry["rates"]))
    rates = measure(config, device, candidates)
    fastest = max(candidates, key=lambda c: rates[variant_label(*c)])
    choice = Choice(*fastest, "measured", rates)
    entries[key] = {"precision": choice.precision, "channels_last": choice.channels_last, "rates": rates}
    _write_cache(path, entries)
    return choice


def _precisions(device: torch.device) -> list[str]:
    native = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else cpu_has_native_bf16()
    return ["fp32", "bf16"] if native else ["fp32"]


def _layouts(device: torch.device) -> list[bool]:
    return [True] if device.type == "cuda" else [False, True]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tune-cifar"


def device_name(device: torch.device) -> str:
    """The device as a speed-relevant name: the GPU's model, or the CPU's model and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cache_key(config: TrainConfig, device: torch.device) -> str:
    """What a measurement holds for: device, torch version, the network's shape and the batch size."""
    shape = f"{config.model} filters={config.filters} batchnorm={config.batchnorm} activation={config.activation}"
    return f"{device_name(device)} | torch {torch.__version__} | {shape} | batch {config.batch_size}"


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or foreign file is ignored with one warning line."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError("not a tune-cifar precision cache of this version")
        entries = data["entries"]
        for entry in entries.values():
            rates = entry["rates"]
            if (
                entry["precision"] not in ("fp32", "bf16")
                or not isinstance(entry["channels_last"], bool)
                or not all(isinstance(rate, (int, float)) for rate in rates.values())
            ):
                raise ValueError(f"bad entry {entry!r}")
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        print(f"warning: ignoring the precision cache {path} ({exc}); measuring again", file=sys.stderr)
        return {}
    return entries


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Atomically; a cache that cannot be written only costs a measurement next time."""
    from tune_cifar.tables import write_atomic_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
    except OSError as exc:
        print(f"warning: cannot write the precision cache {path} ({exc.strerror or exc})", file=sys.stderr)


def measure(config: TrainConfig, device: torch.device, candidates: list[tuple[str, bool]]) -> dict[str, float]:
    """Training images per second of each candidate: one warm-up step each, then the median of
    :data:`TIMED_STEPS` steps taken round-robin."""
    from tune_cifar.losses import build_loss
    from tune_cifar.models import build_model

    images = torch.randn(config.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (config.batch_size,), device=device)
    loss_fn = build_loss(config)
    runs = []
    for precision, channels_last in candidates:
        model = build_model(config).to(device, memory_format=_layout(channels_last))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
        runs.append((precision, channels_last, model, optimizer))
    times: dict[str, list[float]] = {variant_label(p, cl): [] for p, cl, _, _ in runs}
    images = images.contiguous(memory_format=_layout(device.type == "cuda"))  # as DeviceLoader feeds them
    for round_ in range(TIMED_STEPS + 1):
        for precision, channels_last, model, optimizer in runs:
            seconds = _step(model, optimizer, loss_fn, images, labels, device, precision)
            if round_:  # the first round warms up (allocations, kernel choice)
                times[variant_label(precision, channels_last)].append(seconds)
    return {name: config.batch_size / sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any, images: torch.Tensor,
          labels: torch.Tensor, device: torch.device, precision: str) -> float:  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with autocast(device, precision):
        logits = model(images)
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
