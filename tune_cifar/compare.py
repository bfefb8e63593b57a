"""Compare the levels of a factor fairly: ``python -m tune_cifar.compare --space grid_optimizers --name NAME``.

A one-factor grid holds every other key at the baseline's value, learning rate included, so it
measures each level at the value tuned for one of them (SGD at Adam's learning rate). Choi et
al. (2019) and Sivaprasad et al. (2020) showed such comparisons can invert once every level is
tuned; the DeepOBS protocol tunes each, then reruns the best setting over fresh seeds. This
command runs that protocol for the ``tune:`` section of a space file, as two ordinary studies
in ``STORAGE/NAME``:

1. ``tuning``: every level of the grid × the same K proposals of the tuned keys (paired, see
   :mod:`tune_cifar.proposals`), one seed (``--seed``), the full budget, no early stopping;
2. selection on validation: each level's proposal with the best final validation accuracy,
   flagged when it is the lowest or highest value tried ("widen the range"), in ``selection.json``;
3. ``confirm``: every level at the baseline's values of the tuned keys and at its selected values,
   each with S fresh seeds (``--seed`` + 1 ... + S), so both views rest on the same seeds.

``analysis/comparison.py STORAGE/NAME`` reports it (intervals, paired differences, expected best
after k trials, rankings across epochs) from the Parquet tables. Running the same command again
continues where it stopped: each stage is a study that ``--resume`` continues, a finished one
returns at once. ``--selected-from OTHER`` skips the tuning and confirms OTHER's selection at this
command's budget (is the ordering the same with more data and epochs?). Other flags go to
``tune_cifar.search`` unchanged (data, budget, precision, resources).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tune_cifar import cli, spaces
from tune_cifar import config as cfg
from tune_cifar.errors import UsageError
from tune_cifar.proposals import for_level, proposals
from tune_cifar.storage import DEFAULT_STORAGE
from tune_cifar.tables import write_atomic_text

PLAN = "comparison.json"
SELECTION = "selection.json"
REFUSED = 2  # a stage's exit code for bad input (cli.run)
# Flags the comparison decides for its studies (the stage's name, space, seeds and size).
NOT_FORWARDED = ("--space", "--name", "--resume", "--seeds", "--num-samples", "--grace-period")


def parse_args(argv: Sequence[str] | None) -> tuple[Any, list[str]]:
    parser = cli.ArgumentParser(prog="python -m tune_cifar.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="a space file with a one-key grid and a tune: section")
    parser.add_argument("--name", required=True, help="the comparison's folder under --storage-path")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE, help="a local folder (default studies)")
    parser.add_argument("--tuning-trials", type=int, help="K, tuning trials per level (default: tune.trials)")
    parser.add_argument("--confirm-seeds", type=int, help="S, confirmation seeds per level (default: tune.seeds)")
    parser.add_argument(
        "--selected-from", help="a comparison folder whose selection to confirm here (skips the tuning stage)"
    )
    parser.add_argument(
        "--views",
        choices=("both", "tuned"),
        default="both",
        help="confirm each level at the baseline's and at its selected values (both), or at its selected only",
    )
    parser.add_argument("--seed", type=int, default=0, help="tuning seed and data split; confirmation: the next S")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), help="every run's precision (default: the space's; never auto)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as tune_cifar.search's")
    args, forwarded = parser.parse_known_args(argv)
    for flag in forwarded:
        if flag.split("=")[0] in NOT_FORWARDED:
            raise UsageError(f"{flag.split('=')[0]}: the comparison sets it for its studies; leave it out")
    own = [f"--seed={args.seed}"] + ([f"--precision={args.precision}"] if args.precision else [])
    forwarded = [*forwarded, *own, *(f"--set={assignment}" for assignment in args.set)]
    if args.tuning_trials is not None and args.tuning_trials < 1:
        raise UsageError(f"--tuning-trials must be at least 1, got {args.tuning_trials}")
    if args.confirm_seeds is not None and args.confirm_seeds < 2:
        raise UsageError(f"--confirm-seeds must be at least 2 (a spread needs two seeds), got {args.confirm_seeds}")
    if "://" in args.storage_path:
        raise UsageError(f"--storage-path {args.storage_path}: a comparison needs a local folder (it reads its tables)")
    return args, forwarded


@dataclass(frozen=True)
class Comparison:
    """What a comparison is (``comparison.json``): the factor, its levels, the tuned keys and the design."""

    space_file: str
    factor: str
    levels: list[Any]
    tuned: dict[str, dict[str, Any]]  # key -> {kind, values}, as the space file gives it
    baseline: dict[str, Any]  # the tuned keys' values in the baseline view
    trials: int
    seeds: int
    tuning_seed: int
    confirm_seeds: list[int]
    proposals: dict[str, list[dict[str, Any]]]  # level (as text) -> the proposals it runs
    selected_from: str | None
    views: str  # "both" (baseline and tuned) or "tuned"
    search_args: list[str]  # the flags every stage runs with (resources and paths may change on continuing)
    # the stages' budget and data (max_epochs, data, subset, val_size, seed, precision, held keys);
    # empty in a comparison started before it was recorded
    study_flags: dict[str, Any] = dataclasses.field(default_factory=dict)

    def baseline_view(self, active: list[str]) -> dict[str, Any]:
        """The baseline's values of the tuned keys active for a level: what a one-factor grid runs."""
        return {key: self.baseline[key] for key in active}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, default=str) + "\n"

    @classmethod
    def load(cls, folder: Path) -> Comparison:
        path = folder / PLAN
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: not a comparison plan ({exc})") from None


def plan(args: Any, forwarded: list[str]) -> tuple[Comparison, spaces.Space]:
    """The comparison these flags ask for, checked before anything is written."""
    from tune_cifar import search

    space = spaces.load(args.space)
    if space.tune is None:
        raise UsageError(f"{space.path}: no tune: section (run a plain study with python -m tune_cifar.search)")
    ((factor, levels),) = space.grid.items()
    held = cfg.parse_assignments(args.set)
    for key in held:
        if key in (factor, "seed") or key in space.tune.params:
            raise UsageError(f"--set {key}: the comparison decides it ({space.path}); edit the space file instead")
    if "seed" in space.fixed:
        raise UsageError(f"{space.path}: fixed.seed: the comparison sets the seeds (--seed, then the next S)")
    precision = args.precision or held.get("precision") or space.fixed.get("precision")
    if precision in (None, "auto"):
        raise UsageError(
            f"--precision: {space.path} leaves it to auto, which measures each level's network on each node and may "
            "train levels in different precisions; give --precision fp32 or bf16"
        )
    stage = search.parse_args([*forwarded, "--space", str(space.path)])  # the stages' flags, checked now
    spaces.check_max_epochs(space, stage.max_epochs or space.max_epochs, held)
    study_flags = {flag: getattr(stage, flag) for flag in ("max_epochs", "data", "subset", "val_size", "seed")}
    trials = args.tuning_trials or space.tune.trials
    seeds = args.confirm_seeds or space.tune.seeds
    defaults = cfg.to_dict(cfg.TrainConfig())
    fixed = {**space.fixed, **held}
    baseline = {key: fixed.get(key, defaults[key]) for key in space.tune.params}
    proposed = proposals(space.tune.params, trials, args.seed)
    per_level = {str(level): for_level(proposed, {**fixed, factor: level}) for level in levels}
    comparison = Comparison(
        space_file=str(space.path.resolve()),
        factor=factor,
        levels=list(levels),
        tuned={key: {"kind": d.kind, "values": list(d.values)} for key, d in space.tune.params.items()},
        baseline=baseline,
        trials=trials,
        seeds=seeds,
        tuning_seed=args.seed,
        confirm_seeds=list(range(args.seed + 1, args.seed + 1 + seeds)),
        proposals=per_level,
        selected_from=str(Path(args.selected_from).resolve()) if args.selected_from else None,
        views=args.views,
        study_flags={**study_flags, "precision": precision, "held": held},
        search_args=forwarded,
    )
    return comparison, space


def stage_space(space: spaces.Space, comparison: Comparison, points: list[dict[str, Any]], what: str) -> str:
    """A stage's space file: the baseline's fixed keys (less the varied ones) and the stage's points."""
    varied = {comparison.factor, *comparison.tuned}
    fixed = {key: value for key, value in space.fixed.items() if key not in varied}
    raw = {
        "description": f"{what} of {comparison.factor} ({Path(comparison.space_file).name}), "
        "written by tune_cifar.compare",
        "max_epochs": space.max_epochs,
        "data": {"source": space.source, "subset": space.subset, "val_size": space.val_size},
        "asha": None,  # selection and confirmation at the full budget
        "max_concurrent": space.max_concurrent,
        "fixed": fixed,
        "points": points,
    }
    return yaml.safe_dump(raw, sort_keys=False)


def tuning_points(comparison: Comparison) -> list[dict[str, Any]]:
    return [
        {comparison.factor: level, **proposal}
        for level in comparison.levels
        for proposal in comparison.proposals[str(level)]
    ]


def confirm_points(comparison: Comparison, selection: dict[str, Any]) -> list[dict[str, Any]]:
    """Each level at the baseline's and at its selected values, over the confirmation seeds; where the
    two coincide the runs serve both views."""
    points: list[dict[str, Any]] = []
    for level in comparison.levels:
        chosen = selection[str(level)]
        views = [comparison.baseline_view(chosen["active"])] if comparison.views == "both" else []
        if chosen["values"] is not None:
            views.append(chosen["values"])
        for values in views:
            for seed in comparison.confirm_seeds:
                point = {comparison.factor: level, **values, "seed": seed}
                if point not in points:
                    points.append(point)
    return points


def select(comparison: Comparison, trials: Any) -> dict[str, Any]:
    """Each level's best proposal by final validation accuracy (ties: the earlier proposal), with the
    tuned keys whose selected value is the lowest or highest tried. Only trials that ran every
    epoch count; a level none of whose trials did is not selected (``values`` None)."""
    from tune_cifar.tables import ran_every_epoch

    selection = {}
    for level in comparison.levels:
        tried = comparison.proposals[str(level)]
        scores: list[float | None] = [None] * len(tried)
        rows = trials[same_level(trials[comparison.factor], level) & ran_every_epoch(trials)]
        for _, row in rows.iterrows():
            for index, proposal in enumerate(tried):
                if all(same_value(row[key], value) for key, value in proposal.items()):
                    scores[index] = float(row["final_val_acc"])
        finished = [i for i, score in enumerate(scores) if score is not None and not math.isnan(score)]
        active = sorted({key for proposal in tried for key in proposal})
        if not finished:
            selection[str(level)] = {"values": None, "val_acc": None, "finished": 0, "at_bound": {}, "active": active}
            continue
        best = max(finished, key=lambda i: (scores[i], -i))
        values = tried[best]
        at_bound = {}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and len(tried) > 1:
                column = [proposal[key] for proposal in tried]
                if value == min(column):
                    at_bound[key] = "lowest"
                elif value == max(column):
                    at_bound[key] = "highest"
        selection[str(level)] = {
            "values": values,
            "val_acc": scores[best],
            "finished": len(finished),
            "at_bound": at_bound,
            "active": active,
        }
    return selection


def same_value(stored: Any, value: Any) -> bool:
    """Whether a ``trials`` cell (numpy or pandas scalar, null for an inactive key) holds ``value``."""
    if stored is None or stored is pd.NA or (isinstance(stored, float) and math.isnan(stored)):
        return False
    if isinstance(value, float):
        return math.isclose(float(stored), value, rel_tol=1e-9)
    return bool(stored == value)


def same_level(column: pd.Series, level: Any) -> pd.Series:
    """The rows of a ``trials`` column at one level of the factor (numbers compared as numbers)."""
    return column.map(lambda stored: same_value(stored, float(level) if isinstance(level, float) else level))


def run_stage(folder: Path, stage: str, space_text: str, search_args: list[str]) -> int:
    """Run (or continue) one stage's study in its own process group. Ctrl-C and SIGTERM reach this
    process alone (not twice, through the terminal's group) and are passed on to the study, which
    stops the way a study stops and can be resumed; a second Ctrl-C aborts it, as it would a study."""
    space_file = folder / f"{stage}.yaml"
    if not (folder / stage / "study.json").is_file():
        write_atomic_text(space_file, space_text)
    resume = ["--resume"] if (folder / stage / "study.json").is_file() else []
    command = [
        sys.executable, "-m", "tune_cifar.search", "--space", str(space_file), "--name", stage,
        "--storage-path", str(folder), *resume, *search_args,
    ]  # fmt: skip
    print(f"== {stage}: {' '.join(command[1:])}", flush=True)
    process = subprocess.Popen(command, start_new_session=True)
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args, forwarded = parse_args(argv)
    comparison, space = plan(args, forwarded)
    folder = Path(args.storage_path).expanduser() / args.name
    cli.require_writable(folder, "--storage-path")
    if (folder / PLAN).is_file():
        stored = Comparison.load(folder)
        for key, value in comparison.__dict__.items():
            # Not part of the design: where the space file lives (another checkout), the resources and
            # paths among the stages' flags, and the proposals (kept as stored: an upgraded scipy may
            # draw a different Halton sequence for the same design).
            moved = ("space_file", "selected_from", "search_args", "proposals")  # selected_from: by its selection
            if key in moved or (key == "study_flags" and not stored.study_flags):
                continue
            if getattr(stored, key) != json.loads(json.dumps(value, default=str)):
                raise UsageError(f"{folder}: started with {key} = {getattr(stored, key)}, not {value}; "
                                 "a continued comparison keeps its settings (or pick a new --name)")  # fmt: skip
        comparison = dataclasses.replace(comparison, proposals=stored.proposals)
    selection = None
    if comparison.selected_from:
        selection = _selection_of(Path(comparison.selected_from), comparison)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / PLAN).is_file():
        write_atomic_text(folder / PLAN, comparison.to_json())
    again = cli.python_command("-m", "tune_cifar.compare", *(argv if argv is not None else sys.argv[1:]))
    if selection is None:
        tuning = stage_space(space, comparison, tuning_points(comparison), "Tuning")
        code = _first_or_next_stage(folder, "tuning", tuning, comparison, created)
        if code:
            return _stopped("tuning", code, again)
        from tune_cifar.tables import read_table

        selection = select(comparison, read_table(folder / "tuning", "trials"))
    write_atomic_text(folder / SELECTION, json.dumps(selection, indent=2) + "\n")
    _print_selection(comparison, selection)
    points = confirm_points(comparison, selection)
    if not points:
        print(f"no level has a selection to confirm ({folder / SELECTION}): every tuning trial failed", flush=True)
        return 1
    code = _first_or_next_stage(folder, "confirm", stage_space(space, comparison, points, "Confirmation"), comparison,
                                created)  # fmt: skip
    if code:
        return _stopped("confirmation", code, again)
    print(f"report: {cli.python_command('analysis/comparison.py', folder)}")
    return 0


def _first_or_next_stage(folder: Path, stage: str, space_text: str, comparison: Comparison, created: bool) -> int:
    """:func:`run_stage`; a comparison this command created whose stage was refused at start-up (the
    study said why, before any trial) is removed whole: bad input leaves nothing behind."""
    code = run_stage(folder, stage, space_text, comparison.search_args)
    if code == REFUSED and created and not (folder / stage).exists():
        shutil.rmtree(folder)
    return code


def _stopped(stage: str, code: int, again: str) -> int:
    """A stage's exit passed on; after anything but bad input (the study printed it), how to continue."""
    if code != REFUSED:
        print(f"the {stage} stage stopped (exit {code}); continue with: {again}", flush=True)
    return code


def _selection_of(other: Path, comparison: Comparison) -> dict[str, Any]:
    """Another comparison's selection, for the same factor, levels and tuned keys."""
    path = other / SELECTION
    if not path.is_file():
        raise UsageError(f"--selected-from {other}: no {SELECTION} (its tuning stage has not finished)")
    source = Comparison.load(other)
    for key in ("factor", "levels", "tuned", "baseline"):
        if getattr(source, key) != json.loads(json.dumps(getattr(comparison, key))):
            here = getattr(comparison, key)
            raise UsageError(f"--selected-from {other}: {key}: {getattr(source, key)} there, {here} here")
    return json.loads(path.read_text())


def _print_selection(comparison: Comparison, selection: dict[str, Any]) -> None:
    for level in comparison.levels:
        chosen = selection[str(level)]
        if chosen["values"] is None:
            print(f"{comparison.factor}={level}: no tuning trial ran every epoch; confirmed at the baseline only")
            continue
        values = ", ".join(f"{key}={value}" for key, value in chosen["values"].items()) or "nothing to tune"
        flags = "".join(f"; {key} is the {end} value tried: widen the range" for key, end in chosen["at_bound"].items())
        print(f"{comparison.factor}={level}: {values} (validation {100 * chosen['val_acc']:.2f}%){flags}")


if __name__ == "__main__":
    cli.run(main)
