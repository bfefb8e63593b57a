"""Precision: ``auto`` detects native bf16 from the CPU's flags, bf16 is really used, fp32 is kept when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tune_cifar.config import TrainConfig
from tune_cifar.data import load_splits
from tune_cifar.engine import Trainer
from tune_cifar.precision import cpu_has_native_bf16, resolve

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # AMD Zen 4, Cooper Lake
        ("flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n", True),  # Sapphire Rapids
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n", False),  # AVX-512 without bf16: emulated
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
        ("Features\t: fp asimd crc32\n", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, cpuinfo: str, native: bool) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_native_bf16(path) is native


def test_unreadable_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "missing") is False


def test_auto_follows_the_hardware_and_explicit_choices_are_kept() -> None:
    assert resolve("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve("fp32", CPU) == "fp32" and resolve("bf16", CPU) == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_computes_in_the_precision_it_reports(precision: str) -> None:
    splits = load_splits("synthetic", subset=200)
    trainer = Trainer(TrainConfig(filters=(8, 16, 32), batch_size=32, epochs=1, precision=precision), splits)
    images, labels = next(iter(trainer.train_loader))
    loss, logits = trainer.forward_loss(images, labels)
    assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert loss.dtype == torch.float32  # losses are reduced in float32 either way
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay float32
    trainer.train_epoch()
    assert trainer.summary()["precision"] == precision


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: auto means fp32 here")
def test_auto_trains_in_bf16_on_a_bf16_cpu_and_records_it(tmp_path: Path) -> None:
    runs = {}
    for flag in ((), ("--precision", "fp32")):
        out = tmp_path / ("auto" if not flag else "fp32")
        done = subprocess.run(
            [sys.executable, "-m", "tune_cifar.train", "--epochs", "1", "--subset", "200", "--out", str(out), *flag],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        runs[out.name] = pd.read_parquet(out / "trials").iloc[0]["precision"]
    assert runs == {"auto": "bf16", "fp32": "fp32"}
