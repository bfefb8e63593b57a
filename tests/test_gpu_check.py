"""``benchmarks/gpu_check.py``: its refusal without a GPU and its harness (rehearsed on the CPU);
the GPU figures themselves need a GPU (README, Benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/gpu_check.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a CUDA GPU")
def test_without_a_gpu_it_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    done = gpu_check("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: no CUDA GPU: torch ")
    assert not (tmp_path / "out").exists()


def test_rehearsed_on_the_cpu_each_step_is_logged_and_summarised(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gpu_check("--out", str(out), "--device", "cpu", "--only", "versions", "cuda_tests")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["gpu"] is None
    assert summary["steps"]["cuda_tests"]["exit"] == 0 and "-m cuda" in (out / "cuda_tests.log").read_text()
    assert json.loads((out / "versions.json").read_text()) == summary["versions"]


def test_the_budget_stops_a_step_and_skips_the_rest_without_losing_the_summary(tmp_path: Path) -> None:
    """One lease answers everything it can: a step past its time is stopped and recorded (exit 124),
    the steps after the budget is spent are recorded as skipped, and the check exits 1."""
    out = tmp_path / "out"
    done = gpu_check("--out", str(out), "--device", "cpu", "--budget-s", "2", "--only", "throughput", "smoke_study")
    assert done.returncode == 1, done.stdout + done.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["throughput"]["exit"] == 124 and "(stopped after 2 s)" in (out / "throughput.log").read_text()
    assert steps["smoke_study"] == {"exit": None, "skipped": "budget spent"}
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu check: 0 of 2 steps ok; failed: throughput, smoke_study")
