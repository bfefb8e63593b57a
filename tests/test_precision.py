"""Precision: native bf16 from the CPU's flags, ``auto`` measured and cached, bf16 really used, fp32 kept."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tune_cifar import calibration
from tune_cifar.config import TrainConfig
from tune_cifar.data import load_splits
from tune_cifar.engine import Trainer
from tune_cifar.errors import UsageError
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


def test_explicit_choices_are_kept_and_auto_is_not_resolved_from_flags() -> None:
    assert resolve("fp32", CPU) == "fp32" and resolve("bf16", CPU) == "bf16"
    with pytest.raises(UsageError, match="'auto'"):
        resolve("auto", CPU)  # auto is measured (calibration.choose), never read off the flags


SMALL = TrainConfig(filters=(8, 16, 32), batch_size=32, epochs=1)


def test_auto_measures_once_then_reads_the_cache(tmp_path: Path) -> None:
    first = calibration.choose(SMALL, CPU, cache_dir=tmp_path)
    assert first.source == "measured"
    expected = {"fp32", "fp32+cl"} | ({"bf16", "bf16+cl"} if cpu_has_native_bf16() else set())
    assert set(first.rates) == expected and all(rate > 0 for rate in first.rates.values())
    assert first.rates[first.label] == max(first.rates.values())  # the fastest wins
    again = calibration.choose(SMALL, CPU, cache_dir=tmp_path)
    assert again.source == "cached" and (again.precision, again.channels_last) == (first.precision, first.channels_last)
    wider = calibration.choose(dataclasses.replace(SMALL, batch_size=64), CPU, cache_dir=tmp_path)
    assert wider.source == "measured"  # another batch size is another shape
    entries = json.loads((tmp_path / "precision.json").read_text())["entries"]
    assert len(entries) == 2 and all("batch 32" in key or "batch 64" in key for key in entries)


def test_explicit_precision_wins_over_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_measuring(*args: object) -> None:
        raise AssertionError("measured although the precision was explicit or cached")

    key = calibration.cache_key(SMALL, CPU)
    entry = {"precision": "bf16", "channels_last": True, "rates": {"fp32": 1.0, "bf16+cl": 2.0}}
    (tmp_path / "precision.json").write_text(json.dumps({"version": 1, "entries": {key: entry}}))
    monkeypatch.setattr(calibration, "measure", no_measuring)
    explicit = calibration.choose(dataclasses.replace(SMALL, precision="fp32"), CPU, cache_dir=tmp_path)
    assert (explicit.precision, explicit.channels_last, explicit.source) == ("fp32", False, "explicit")
    assert explicit.rates == {}
    cached = calibration.choose(SMALL, CPU, cache_dir=tmp_path)
    assert (cached.precision, cached.channels_last, cached.source) == ("bf16", True, "cached")


@pytest.mark.parametrize("content", ["{not json", '{"entries": 3}', "[1, 2]", '{"version": 1, "entries": {"k": {}}}'])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_line(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "precision.json").write_text(content)
    choice = calibration.choose(SMALL, CPU, cache_dir=tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert choice.source == "measured"
    assert len(lines) == 1 and lines[0].startswith("warning: ignoring the precision cache"), lines
    assert calibration.choose(SMALL, CPU, cache_dir=tmp_path).source == "cached"  # replaced by a good one
    assert capsys.readouterr().err == ""


def test_a_cache_hit_and_a_miss_train_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    splits = load_splits("synthetic", subset=200)
    miss, hit = Trainer(SMALL, splits), Trainer(SMALL, splits)
    assert (miss.computing.source, hit.computing.source) == ("measured", "cached")
    for a, b in zip(miss.model.parameters(), hit.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the measurement ran before the trial's seed: same initial weights


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


def test_a_restored_trainer_keeps_the_precision_and_layout_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    splits = load_splits("synthetic", subset=200)
    first = Trainer(SMALL, splits)
    state = first.state_dict()
    other = not first.computing.channels_last
    state["computing"] = {**state["computing"], "channels_last": other, "precision": "fp32"}
    restored = Trainer(SMALL, splits)  # this node's (cached) choice ...
    restored.load_state_dict(state)  # ... gives way to the checkpoint's
    assert (restored.precision, restored.computing.channels_last) == ("fp32", other)
    conv = next(p for p in restored.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last if other else torch.contiguous_format)
    restored.train_epoch()
    assert restored.summary()["channels_last"] is other


def test_train_records_what_auto_chose_and_measured(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    outs = []
    for name in ("first", "second"):
        out = tmp_path / name
        done = subprocess.run(
            [sys.executable, "-m", "tune_cifar.train", "--epochs", "1", "--subset", "200", "--out", str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outs.append((done.stdout.splitlines()[0], pd.read_parquet(out / "trials").iloc[0]))
    (first_line, first), (second_line, second) = outs
    assert "(measured: fp32 " in first_line and "(cached: fp32 " in second_line
    assert first["precision"] in ("fp32", "bf16") and first["precision_rates"].endswith("img/s")
    assert (second["precision"], second["channels_last"]) == (first["precision"], first["channels_last"])
    assert first_line.split(", seed")[0].endswith(first["precision_rates"] + ")")
    explicit = tmp_path / "fp32"
    done = subprocess.run(
        [sys.executable, "-m", "tune_cifar.train", "--epochs", "1", "--subset", "200", "--precision", "fp32",
         "--out", str(explicit)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "fp32 (explicit)" in done.stdout.splitlines()[0]
    row = pd.read_parquet(explicit / "trials").iloc[0]
    assert row["precision"] == "fp32" and not row["channels_last"] and pd.isna(row["precision_rates"])
