"""What the study machinery costs and what ASHA saves: ``python benchmarks/study_overhead.py``.

Runs the smoke study (or ``--space``) in a fresh folder and compares

* the driver's wall time with the ideal one, sum(trial compute) / concurrency, where a trial's
  compute is its epochs' training + validation seconds: the rest is orchestration (Ray
  start-up, actor start, checkpoints, reporting, the driver's callbacks), and
* the epochs trained with the epochs a study without early stopping would train,
  num_samples x max_epochs: the difference is what ASHA saved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="smoke")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--keep", action="store_true", help="keep the study folder")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="study-overhead-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "tune_cifar.search", "--space", args.space, "--name", "bench"]
    cmd += ["--storage-path", str(root), "--wandb", "disabled"]
    if args.num_samples:
        cmd += ["--num-samples", str(args.num_samples)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"study failed ({done.returncode}):\n{done.stderr[-3000:]}")
    match = re.search(r"epochs in ([0-9.]+) s", done.stdout)
    fit = float(match.group(1)) if match else float("nan")

    folder = root / "bench"
    settings = json.loads((folder / "study.json").read_text())
    trials = pd.read_parquet(folder / "trials")
    epochs = pd.read_parquet(folder / "epochs")
    space_concurrency = _concurrency(folder, len(trials))
    compute = epochs["seconds"].sum()
    ideal = compute / space_concurrency
    budget = settings["num_samples"] * settings["max_epochs"]
    trained = int(epochs.shape[0])

    stopped = int((trials.status == "STOPPED").sum())
    rows = [
        ("wall time, whole command (Ray start, data, study)", f"{total:.1f} s"),
        ("wall time, Tuner.fit", f"{fit:.1f} s"),
        ("trial compute (sum of epoch seconds)", f"{compute:.1f} s"),
        (f"ideal = compute / concurrency ({space_concurrency})", f"{ideal:.1f} s"),
        ("orchestration overhead (fit - ideal)", f"{fit - ideal:.1f} s ({(fit - ideal) / fit:.0%} of fit)"),
        ("epochs trained / without early stopping", f"{trained} / {budget} ({1 - trained / budget:.0%} saved)"),
        ("trials stopped by ASHA", f"{stopped} of {len(trials)}"),
    ]
    print(f"study {Path(settings['space']).stem}: {len(trials)} trials, up to {settings['max_epochs']} epochs each")
    for label, value in rows:
        print(f"{label:<52}{value}")
    if args.keep:
        print(f"study folder: {folder}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _concurrency(folder: Path, num_trials: int) -> int:
    """Trials that could run at once: the space's max_concurrent, bounded by the CPUs (1 CPU a trial)."""
    from tune_cifar import spaces

    space = spaces.load(folder / "space.yaml")
    cpus = os.cpu_count() or 1
    return max(1, min(space.max_concurrent or cpus, cpus, num_trials))


if __name__ == "__main__":
    main()
