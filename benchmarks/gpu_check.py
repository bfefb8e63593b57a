"""The GPU path, run once end to end on one GPU, with every figure in one folder: ``python
benchmarks/gpu_check.py --out DIR``.

Prepared so that one short lease of a GPU answers everything (at most about 8 minutes, ``--budget-s``):

1. ``versions``: the GPU's name and memory, torch, CUDA and cuDNN versions (``versions.json``);
2. ``cuda_tests``: ``pytest -m cuda`` (bf16 + channels_last step, device loader, checkpoint
   round trip with the CUDA RNG, ``train --compile``);
3. ``throughput``: ``train_throughput.py`` for the three networks in fp32 and bf16 (channels_last
   on CUDA), then ``throughput_compile``: the conditioned CNN in bf16 with ``torch.compile``;
4. ``packing``: ``trial_packing.py`` with 2, 4 and 8 trials per GPU through Ray (each run times
   one trial alone first), the study's ``--gpus-per-trial 0.5 / 0.25 / 0.125``;
5. ``smoke_study``: ``tune_cifar.search --space smoke --data synthetic --gpus-per-trial 0.25``.

Each step runs in its own process with its own time limit (never past the budget left), its
output in ``DIR/STEP.log``; a step that fails or runs out of time is recorded and the next one
runs. ``DIR/summary.json`` holds each step's exit code, seconds and the figures parsed from its
output. Without a CUDA GPU it refuses in one line (exit 2) and writes nothing; ``--device cpu``
rehearses the same harness on a CPU (the tests use it), ``--only STEP ...`` reruns some steps.
Ray, Optuna and W&B must be installed where it runs (the packing and study steps need them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tune_cifar import cli
from tune_cifar.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _throughput(device: str, compile: bool) -> list[str]:
    models = ["conditioned_cnn"] if compile else ["small_cnn", "conditioned_cnn", "vgg_a"]
    precisions = ["bf16"] if compile else ["fp32", "bf16"]
    command = [PYTHON, "benchmarks/train_throughput.py", "--device", device, "--skip-per-sample", "--models", *models]
    command += ["--precisions", *precisions, "--images", "25600" if device == "cuda" else "512", "--repeats", "3"]
    return command + (["--compile"] if compile else [])


def _packing(device: str) -> list[list[str]]:
    seconds = "8" if device == "cuda" else "2"
    counts = ("2", "4", "8") if device == "cuda" else ("2",)
    return [[PYTHON, "benchmarks/trial_packing.py", "--device", device, "--trials", n, "--seconds", seconds]
            for n in counts]  # fmt: skip


def _smoke_study(device: str, storage: Path) -> list[str]:
    gpus = ["--gpus-per-trial", "0.25"] if device == "cuda" else ["--gpus-per-trial", "0"]
    return [PYTHON, "-m", "tune_cifar.search", "--space", "smoke", "--data", "synthetic", *gpus,
            "--storage-path", str(storage), "--name", "gpu-smoke", "--wandb", "disabled"]  # fmt: skip


# step -> (time limit in seconds, the commands it runs given the device and a scratch folder)
STEPS: dict[str, tuple[int, Callable[[str, Path], list[list[str]]]]] = {
    "cuda_tests": (120, lambda device, _: [[PYTHON, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]]),
    "throughput": (150, lambda device, _: [_throughput(device, compile=False)]),
    "throughput_compile": (90, lambda device, _: [_throughput(device, compile=True)]),
    "packing": (150, lambda device, _: _packing(device)),
    "smoke_study": (120, lambda device, scratch: [_smoke_study(device, scratch / "studies")]),
}
ALL_STEPS = ("versions", *STEPS)


def versions(device: str) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        found |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                  "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                  "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    else:
        found |= {"gpu": None, "rehearsal": "cpu"}
    return found


def figures(step: str, output: str) -> dict[str, Any]:
    """The numbers a step's output states, for the summary (its log keeps everything)."""
    if step.startswith("throughput"):
        rows = re.findall(r"^(\w+)\s+(fp32|bf16)\s+(\d+)", output, re.MULTILINE)
        return {f"{model} {precision} images/s": int(rate) for model, precision, rate in rows}
    if step == "packing":
        packed = re.findall(r"^(\d+) packed together:\s+([\d,]+) images/s = ([0-9.]+)x", output, re.MULTILINE)
        alone = re.findall(r"^one trial alone:\s+([\d,]+)", output, re.MULTILINE)
        alone = [int(rate.replace(",", "")) for rate in alone]
        return {"one trial images/s": alone, **{f"{n} packed / one": float(x) for n, _, x in packed}}
    if step == "cuda_tests":
        found = re.search(r"(\d+) passed", output)
        return {"passed": int(found[1]) if found else 0}
    if step == "smoke_study":
        found = re.search(r"^study gpu-smoke: (.*)$", output, re.MULTILINE)
        return {"summary": found[1] if found else None}
    return {}


def run_step(step: str, device: str, out: Path, scratch: Path, budget_left: float) -> dict[str, Any]:
    limit, commands = STEPS[step]
    limit_s = max(1.0, min(limit, budget_left))
    started = time.monotonic()
    code, output = 0, ""
    for command in commands(device, scratch):
        left = limit_s - (time.monotonic() - started)
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(left, 1.0))
            code, output = code or done.returncode, output + f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n"
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            code, output = 124, output + f"$ {' '.join(command)}\n{partial}\n(stopped after {limit_s:.0f} s)\n"
            break
    (out / f"{step}.log").write_text(output)
    return {"exit": code, "seconds": round(time.monotonic() - started, 1), **figures(step, output)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for summary.json, versions.json and one log per step")
    parser.add_argument("--budget-s", type=float, default=480, help="wall-time budget of all steps (480)")
    parser.add_argument("--only", nargs="+", choices=ALL_STEPS, help="run only these steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: rehearse the harness")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"no CUDA GPU: torch {torch.__version__} sees none (this check needs one; --device cpu rehearses it)"
        )
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be positive, got {args.budget_s}")
    out = Path(args.out)
    cli.require_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    steps = [step for step in ALL_STEPS if not args.only or step in args.only]
    summary: dict[str, Any] = {"device": args.device, "budget_s": args.budget_s, "steps": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for step in steps:
            if step == "versions":
                summary["versions"] = versions(args.device)
                (out / "versions.json").write_text(json.dumps(summary["versions"], indent=2) + "\n")
                continue
            left = args.budget_s - (time.monotonic() - started)
            if left <= 0:
                result: dict[str, Any] = {"exit": None, "skipped": "budget spent"}
            else:
                result = run_step(step, args.device, out, Path(scratch), left)
            summary["steps"][step] = result
            print(f"{step}: {json.dumps(result)}", flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [step for step, result in summary["steps"].items() if result.get("exit") != 0]
    failures = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"gpu check: {len(summary['steps']) - len(failed)} of {len(summary['steps'])} steps ok{failures} -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
