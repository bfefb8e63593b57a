"""A study's plan: everything that decides what a study is, resolved once and saved as ``study.json``.

The space file, the command line and the defaults meet here and nowhere else. The plan holds
the effective space (``--set``, ``--max-epochs``, ``--precision`` and ``--seeds`` applied), ASHA's
rungs, the data settings and the concurrency limit; the driver, ``--resume``, ``train
--from-study`` and the analysis load it (:meth:`StudyPlan.load`) instead of reading
``study.json`` or re-applying overrides themselves.

``study.json`` stores the resolved settings (the inputs); the effective space is rebuilt from the
study's copy of its space file (``space.yaml``) by the same :func:`effective_space` on every
load, so a study written by an older version, whose file lacks a later setting, still loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_cifar import config as cfg
from tune_cifar import spaces
from tune_cifar.errors import UsageError
from tune_cifar.study_folder import StudyFolder, as_folder

# Flags that define what a study is; --resume takes them from study.json, not the command line.
STUDY_FLAGS = (
    "space",
    "num_samples",
    "max_epochs",
    "data",
    "subset",
    "val_size",
    "seed",
    "precision",
    "seeds",
    "set",
    "grace_period",
)


@dataclass(frozen=True)
class StudyPlan:
    """What a study is. Fields are stored in ``study.json``; :attr:`space` is derived from them."""

    name: str
    space_file: str  # the space file the study was started from (its copy is STUDY/space.yaml)
    num_samples: int
    max_epochs: int
    data: str
    subset: int | None
    val_size: int | None
    seed: int  # TPE's seed, the data split's, and the first trial seed
    wandb: str
    data_dir: str | None = None
    precision: str | None = None  # None: the space's (else the vocabulary's default, auto)
    seeds: int = 1  # repeats of every grid point
    held: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: keys held over the space's choice
    grace_period: int | None = None  # ASHA's first rung (None: no ASHA)
    max_concurrent: int | None = None  # trials at once (None: as many as the cluster fits)
    space: spaces.Space = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Any, space: spaces.Space, name: str) -> StudyPlan:
        """Resolve a new study from ``tune_cifar.search``'s flags over the space file's values."""
        max_epochs = args.max_epochs or space.max_epochs
        held = held_keys(args.set or [], dataclasses.replace(space, max_epochs=max_epochs))
        spaces.check_max_epochs(space, max_epochs, held)
        if args.grace_period is not None and space.asha is None:
            raise UsageError(f"--grace-period: {space.path} has no ASHA (asha: null)")
        grace = args.grace_period or (space.asha.grace_period if space.asha else None)
        if grace is not None and grace > max_epochs:
            raise UsageError(f"--max-epochs {max_epochs} is below the ASHA grace period {grace}")
        seed = args.seed if args.seed is not None else 0
        seeds = args.seeds or space.seeds
        effective = effective_space(space, max_epochs, args.precision, held, seeds, seed)
        num_samples = args.num_samples or effective.num_samples
        if effective.enumerated and num_samples != effective.num_samples:
            raise UsageError(f"{space.path}: a grid runs each of its {effective.num_samples} combinations once")
        return cls(
            name=name,
            space_file=str(space.path),
            num_samples=num_samples,
            max_epochs=max_epochs,
            data=args.data or space.source,
            subset=args.subset if args.subset is not None else space.subset,
            val_size=args.val_size if args.val_size is not None else space.val_size,
            seed=seed,
            wandb=args.wandb or ("online" if os.environ.get("WANDB_API_KEY") else "offline"),
            data_dir=args.data_dir,
            precision=args.precision,
            seeds=seeds,
            held=held,
            grace_period=grace,
            max_concurrent=args.max_concurrent or space.max_concurrent,
            space=effective,
        )

    def with_space(self, space: spaces.Space) -> StudyPlan:
        """This plan with its effective space, built from the space file's ``space`` (read from the
        study's copy, it keeps the name of the file the study was started from)."""
        named = dataclasses.replace(space, name=Path(self.space_file).stem)
        effective = effective_space(named, self.max_epochs, self.precision, self.held, self.seeds, self.seed)
        return dataclasses.replace(self, space=effective)

    def resumed(self, args: Any) -> StudyPlan:
        """The plan a ``--resume`` runs: the stored one, checked against the study flags given again
        (repeating the original command with ``--resume`` added is accepted), grown by a larger
        ``--num-samples``, with this driver's W&B mode, data folder and concurrency."""
        written = spaces.load(self.space.path)  # the study's copy of its space file
        grown = args.num_samples is not None and args.num_samples > self.num_samples
        if grown and (written.enumerated or self.seeds > 1):
            raise UsageError(f"--num-samples {args.num_samples}: a grid study runs each combination once")
        for flag in STUDY_FLAGS:
            given = getattr(args, flag)
            if given is None or (flag == "num_samples" and grown):
                continue
            stored, given = self._stored_and_given(flag, given, written)
            if stored != given:
                raise UsageError(
                    f"--{flag.replace('_', '-')} {given}: the study was started with {stored} "
                    f"({StudyFolder(self.space.path.parent).plan}); a resumed study keeps its settings"
                )
        return dataclasses.replace(
            self,
            num_samples=args.num_samples if grown else self.num_samples,
            wandb=args.wandb or self.wandb,
            data_dir=args.data_dir or self.data_dir,
            max_concurrent=args.max_concurrent or self.max_concurrent,
        ).with_space(written)

    def _stored_and_given(self, flag: str, given: Any, written: spaces.Space) -> tuple[Any, Any]:
        if flag == "space":
            return str(Path(self.space_file).resolve()), str(spaces.resolve(given).resolve())
        if flag == "set":
            return self.held, held_keys(given, written)
        return getattr(self, flag), given

    # -- what the study derives ----------------------------------------------------------------
    @property
    def reduction_factor(self) -> int | None:
        return self.space.asha.reduction_factor if self.space.asha else None

    @property
    def rungs(self) -> tuple[int, ...]:
        """ASHA's rungs: the epochs at which it compares trials and stops the weaker ones, below
        ``max_epochs`` (Ray's ASHAScheduler, given this grace period, reduction factor and max_t,
        stops trials at exactly these epochs). Empty without ASHA."""
        rungs = []
        milestone = self.grace_period
        while milestone is not None and self.reduction_factor and milestone < self.max_epochs:
            rungs.append(milestone)
            milestone *= self.reduction_factor
        return tuple(rungs)

    @property
    def budgets(self) -> tuple[int, ...]:
        """The epoch counts at which trials of this study can be compared: the rungs and the full budget."""
        return (*self.rungs, self.max_epochs)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: StudyFolder) -> None:
        from tune_cifar.tables import write_atomic_text

        stored = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "space"}
        write_atomic_text(folder.plan, json.dumps(stored, indent=2) + "\n")

    @classmethod
    def load(cls, folder: StudyFolder | Path) -> StudyPlan:
        """The plan of a study folder; a one-line :class:`UsageError` when it has none."""
        folder = as_folder(folder)
        if not folder.plan.is_file():
            raise UsageError(f"{folder.path}: not a tune-cifar study (no {StudyFolder.PLAN})")
        try:
            stored = json.loads(folder.plan.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{folder.plan}: cannot read the study's plan ({exc})") from None
        if "space" in stored:  # written before the plan existed: the same settings, older names
            stored["space_file"] = stored.pop("space")
            stored["held"] = stored.get("held") or {}
        known = {f.name for f in dataclasses.fields(cls)} - {"space"}
        space = spaces.load(folder.space)
        stored.setdefault("max_concurrent", space.max_concurrent)
        if stored.get("grace_period") is None and space.asha:  # older files left the space's grace implicit
            stored["grace_period"] = space.asha.grace_period
        try:
            return cls(**{key: value for key, value in stored.items() if key in known}).with_space(space)
        except TypeError as exc:  # a field missing: not a plan this version (or any) wrote
            raise UsageError(f"{folder.plan}: not a study plan ({exc})") from None

    @classmethod
    def load_if_any(cls, folder: StudyFolder | Path) -> StudyPlan | None:
        """The plan of a study folder; None for a single run's folder (which has none)."""
        folder = as_folder(folder)
        return cls.load(folder) if folder.plan.is_file() else None


def held_keys(assignments: list[str], space: spaces.Space) -> dict[str, Any]:
    """``--set KEY=VALUE`` values, checked against the space (a bad value is refused here)."""
    held = cfg.parse_assignments(assignments)
    fixed = spaces.hold(space, held).fixed  # validated, and in the space's form (filters "32,64,128")
    return {key: fixed[key] for key in held}


def effective_space(
    space: spaces.Space, max_epochs: int, precision: str | None, held: dict[str, Any], seeds: int, seed: int
) -> spaces.Space:
    """The space as the study runs it: ``--max-epochs``, ``--precision`` and ``--set`` override the
    file's, and every grid point is repeated over ``--seeds`` from ``seed`` on."""
    fixed = space.fixed if precision is None else {**space.fixed, "precision": precision}
    held_space = spaces.hold(space, held)
    return dataclasses.replace(held_space, max_epochs=max_epochs, fixed={**fixed, **held_space.fixed}).repeated(
        seeds, seed
    )
