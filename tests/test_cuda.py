"""The CUDA path: bf16 autocast, channels_last, the on-device loader, checkpoints with CUDA RNG
state and ``--compile``. Marked ``cuda``: skipped where torch sees no GPU (this project's CI and
development machine); ``pytest -m cuda`` runs them on a GPU machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_cifar.config import TrainConfig
from tune_cifar.data import DeviceLoader, Splits, load_splits
from tune_cifar.engine import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REPO = Path(__file__).resolve().parents[1]
NARROW = {"model": "conditioned_cnn", "filters": (8, 16, 32), "batch_size": 64}


@pytest.fixture(scope="module")
def splits() -> Splits:
    return load_splits("synthetic", subset=1200, seed=0)


def test_a_train_step_on_the_gpu_is_bf16_autocast_and_channels_last(splits: Splits) -> None:
    trainer = Trainer(TrainConfig(**NARROW, epochs=1), splits, device="cuda")
    assert trainer.precision == "bf16" and torch.cuda.is_bf16_supported()
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, logits, _ = trainer.train_step(images, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_the_device_loader_keeps_batches_on_the_gpu_and_is_seeded(splits: Splits) -> None:
    def batches(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(splits.train_x, splits.train_y, 64, "cuda", train=True, augment=True, seed=seed)
        return [images for images, _ in loader]

    first, again, other = batches(0), batches(0), batches(1)
    assert all(b.is_cuda and b.is_contiguous(memory_format=torch.channels_last) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_checkpoint_round_trip_on_the_gpu_continues_identically(splits: Splits) -> None:
    """The CUDA RNG state travels with the checkpoint: dropout draws on the GPU after a resume
    equal those of the uninterrupted run."""
    config = TrainConfig(**NARROW, dropout=0.3, epochs=2)
    straight = Trainer(config, splits, device="cuda")
    straight.train_epoch()
    state = straight.state_dict()
    assert state["cuda_rng"] is not None
    expected = straight.train_epoch().epoch
    resumed = Trainer(config, splits, device="cuda")
    resumed.load_state_dict(state)
    got = resumed.train_epoch().epoch
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert got["val_acc"] == expected["val_acc"]


def test_train_with_compile_on_the_gpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tune_cifar.train", "--set", "filters=8,16,32", "--epochs", "1", "--subset", "640",
         "--device", "cuda", "--compile", "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch   1/1" in done.stdout and "bf16" in done.stdout
