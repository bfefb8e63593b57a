"""Ray Tune's own cost per trial, without this project: ``python benchmarks/ray_trial_turnover.py``.

The floor under ``study_overhead.py``'s "between trials": ``--trials`` trials of a function that
reports ``--reports`` times and does nothing else (a 0.05 s sleep per report), one at a time,
with Ray's own searcher and concurrency limit and the study's two result loggers (JSON, CSV). Run twice in one
process: with actor reuse (what a one-node study does) and with a fresh actor per trial.
Prints, for each, ``Tuner.fit``'s wall time, the trials' own time and the rest: between trials.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence

from tune_cifar import cli
from tune_cifar.errors import UsageError


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--reports", type=int, default=8)
    args = parser.parse_args(argv)
    if args.trials < 1 or args.reports < 1:
        raise UsageError("--trials and --reports must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as a local study: no warning, loopback only
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # as tune_cifar.search: these two loggers only
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    def trainable(config: dict) -> None:
        for epoch in range(1, args.reports + 1):
            time.sleep(0.05)
            tune.report({"epoch": epoch})

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    between = {}
    with tempfile.TemporaryDirectory(prefix="ray-turnover-") as storage:
        for reuse in (True, False):
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=1, reuse_actors=reuse),
                run_config=tune.RunConfig(
                    name=f"reuse-{reuse}",
                    storage_path=storage,
                    callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
                    verbose=0,
                ),
            )
            started = time.perf_counter()
            results = tuner.fit()
            fit = time.perf_counter() - started
            own = sum(result.metrics["time_total_s"] for result in results)
            between[reuse] = gap = fit - own
            print(f"reuse_actors={reuse!s:<5}  fit {fit:5.1f} s, trials' own time {own:4.1f} s, "
                  f"between trials {gap:4.1f} s ({gap / args.trials:.2f} s per trial)")  # fmt: skip
    ray.shutdown()
    print(f"fresh actors / actor reuse, between trials: {between[False] / between[True]:.2f}x")


if __name__ == "__main__":
    cli.run(main)
