"""Search spaces as YAML files (``search_spaces/NAME.yaml``), validated when they are loaded.

A space file says what a study varies and how long it may run::

    description: what the study is for
    num_samples: 64                      # trials (a grid: its size)
    max_epochs: 100                      # every trial's ``epochs``; ASHA's max_t
    data: {source: cifar10, subset: null, val_size: 5000}
    asha: {grace_period: 5, reduction_factor: 3}   # or ``asha: null``: no early stopping
    max_concurrent: 8                    # or null: as many as the cluster fits
    fixed: {model: conditioned_cnn}      # vocabulary keys held constant
    params:                              # vocabulary keys Optuna samples (TPE, define-by-run)
      lr: {loguniform: [1.0e-4, 1.0e-1]}
    grid: {optimizer: [adam, sgd]}       # instead of params: every combination exactly once
    seeds: 3                             # each grid point (or the fixed config) with 3 seeds
    points: [{optimizer: sgd, lr: 0.05}] # instead of grid/params: these configurations, each once
    tune:                                # for ``tune_cifar.compare``: every grid level tuned on its own
      trials: 8                          # K tuning trials per level, the same proposals for each level
      seeds: 5                           # S confirmation seeds per level and view
      params: {lr: {loguniform: [1.0e-4, 1.0]}}

A study (``tune_cifar.search``) runs a file with ``tune:`` as its grid alone, every level at the
fixed values: the baseline view. ``tune_cifar.compare`` reads ``tune:`` and runs the comparison.

Every key is a key of the configuration vocabulary (:mod:`tune_cifar.config`), so a mistyped
name fails here, with the file and key named, instead of as a crashed trial hours later.
Which sampled keys matter under which choices is *not* written in the file: it comes from
``config.CONDITIONS``, and :class:`DefineByRun` samples a child key only when its parent's
sampled value makes it active (momentum only for SGD, focal_gamma only for the focal loss).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_cifar import config as cfg
from tune_cifar.errors import UsageError

TOP_KEYS = (
    "description",
    "num_samples",
    "max_epochs",
    "data",
    "asha",
    "max_concurrent",
    "fixed",
    "params",
    "grid",
    "seeds",
    "points",
    "tune",
)
TUNE_KEYS = ("trials", "seeds", "params")
DATA_KEYS = ("source", "subset", "val_size")
ASHA_KEYS = ("grace_period", "reduction_factor")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "logint")


def spaces_dir() -> Path:
    """The built-in spaces: ``tune_cifar/search_spaces`` when installed, ``<repo>/search_spaces`` in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "search_spaces", package.parent / "search_spaces"):
        if candidate.is_dir():
            return candidate
    return package.parent / "search_spaces"


def builtin_names() -> list[str]:
    return sorted(path.stem for path in spaces_dir().glob("*.yaml"))


def resolve(name_or_path: str | Path) -> Path:
    """``--space NAME`` (a built-in) or a path to a user's YAML file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or "/" in text:
        raise UsageError(f"space file not found: {path}")
    builtin = spaces_dir() / f"{text}.yaml"
    if builtin.is_file():
        return builtin
    raise UsageError(f"unknown space {text!r} (built-in: {', '.join(builtin_names()) or 'none'}; or give a .yaml path)")


@dataclass(frozen=True)
class Distribution:
    """One sampled key: ``choice`` (categorical), ``uniform``/``loguniform`` floats, ``int``/``logint``."""

    kind: str
    values: tuple[Any, ...]  # the choices, or (low, high)

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial (or Ray's suggest-captor around one) for this key's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        low, high = self.values
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(name, low, high, log=self.kind == "loguniform")
        return trial.suggest_int(name, low, high, log=self.kind == "logint")

    def to_optuna(self) -> Any:
        """The Optuna distribution :meth:`suggest` samples from (what ``optuna.db`` records)."""
        import optuna.distributions as od

        if self.kind == "choice":
            return od.CategoricalDistribution(list(self.values))
        low, high = self.values
        if self.kind in ("uniform", "loguniform"):
            return od.FloatDistribution(low, high, log=self.kind == "loguniform")
        return od.IntDistribution(low, high, log=self.kind == "logint")

    def extremes(self) -> tuple[Any, ...]:
        """The values that must each be a valid setting of the key (all choices, or both bounds)."""
        return self.values


@dataclass(frozen=True)
class Asha:
    grace_period: int
    reduction_factor: int


@dataclass(frozen=True)
class Tuning:
    """``tune:``: keys tuned separately for every level of the grid, with an equal budget."""

    trials: int  # K: tuning trials per level
    seeds: int  # S: confirmation seeds per level and view, none of them the tuning seed
    params: dict[str, Distribution]


@dataclass(frozen=True)
class Space:
    """A validated search-space file."""

    name: str
    path: Path
    description: str
    num_samples: int
    max_epochs: int
    source: str
    subset: int | None
    val_size: int | None
    asha: Asha | None
    max_concurrent: int | None
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Distribution] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    seeds: int = 1  # each grid point (or the one fixed configuration) runs with this many seeds
    points: tuple[dict[str, Any], ...] = ()  # explicit configurations (instead of a grid), each one trial
    tune: Tuning | None = None  # read by tune_cifar.compare only

    @property
    def sampled_keys(self) -> list[str]:
        """Keys set per trial, parents before children so define-by-run can test activity."""
        keys = list(self.params) + list(self.grid) + [key for key in self.point_choices if key not in self.grid]
        return sorted(keys, key=lambda key: (_depth(key), keys.index(key)))

    @property
    def point_choices(self) -> dict[str, tuple[Any, ...]]:
        """Every value each key takes over :attr:`points`, in order of first appearance (Optuna's choices)."""
        choices: dict[str, list[Any]] = {}
        for point in self.points:
            for key, value in point.items():
                seen = choices.setdefault(key, [])
                if value not in seen:
                    seen.append(value)
        return {key: tuple(values) for key, values in choices.items()}

    @property
    def enumerated(self) -> bool:
        """Whether the study runs a list of configurations (grid or points) rather than sampling."""
        return bool(self.grid or self.points)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values in file order, or the listed points (one trial each)."""
        if self.points:
            return [dict(point) for point in self.points]
        if not self.grid:
            return []
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.grid[key] for key in keys))]

    def repeated(self, seeds: int, first_seed: int = 0) -> Space:
        """The space as a study runs it: every grid point once per seed ``first_seed, first_seed + 1, ...``.

        The seed becomes one more grid dimension, so a repeated point is an ordinary trial in
        every table (its ``seed`` column tells the repeats apart) and the per-level tables
        report mean ± std over them. A sampled (TPE) space has no points to repeat.
        """
        if seeds == 1:
            return self
        if self.params:
            raise UsageError(f"{self.path}: seeds {seeds}: only a grid or a fixed configuration can be repeated")
        if "seed" in self.fixed or "seed" in self.grid:
            raise UsageError(f"{self.path}: seeds {seeds}: the space sets seed itself; drop one of them")
        seed_values = tuple(range(first_seed, first_seed + seeds))
        if self.points:
            if "seed" in self.point_choices:
                raise UsageError(f"{self.path}: seeds {seeds}: the points set seed themselves; drop one of them")
            points = tuple({**point, "seed": seed} for point in self.points for seed in seed_values)
            return dataclasses.replace(self, points=points, num_samples=len(points), seeds=seeds)
        grid = {**self.grid, "seed": seed_values}
        size = math.prod(len(values) for values in grid.values())
        return dataclasses.replace(self, grid=grid, num_samples=size, seeds=seeds)

    def constants(self, seed: int = 0) -> dict[str, Any]:
        """What every trial gets besides the sampled keys: the fixed keys, ``epochs`` and a seed."""
        return {"seed": seed, **self.fixed, "epochs": self.max_epochs}

    def trial_config(self, values: dict[str, Any]) -> cfg.TrainConfig:
        """The training config of one trial's values (sampled + constants)."""
        return cfg.from_values(values, source=str(self.path))


def check_max_epochs(space: Space, max_epochs: int, held: dict[str, Any] | None = None) -> None:
    """Refuse a ``--max-epochs`` under which a value the space can sample is invalid (a warm-up
    as long as the run), naming the key and its range, before any trial runs. Keys ``held``
    by ``--set`` are checked at their one value instead of their distribution."""
    held = held or {}
    raw = {**_read_yaml(space.path), "max_epochs": max_epochs}
    raw["params"] = {k: v for k, v in (raw.get("params") or {}).items() if k not in held}
    raw["grid"] = {k: v for k, v in (raw.get("grid") or {}).items() if k not in held}
    raw["fixed"] = {**(raw.get("fixed") or {}), **held}
    if held.keys() & set(space.grid):
        raw.pop("num_samples", None)  # the grid is smaller now
        raw.pop("tune", None)  # compare's section, about the full grid; search runs the grid alone
    try:
        _parse(space.path, raw)
    except UsageError as exc:
        raise UsageError(f"--max-epochs {max_epochs}: {exc}") from None


def hold(space: Space, held: dict[str, Any]) -> Space:
    """``space`` with some keys held at one value: fixed, no longer sampled or in the grid.

    Each value is checked as a fixed value of the space would be (a :class:`UsageError`
    naming the key otherwise).
    """
    if not held:
        return space
    values = {key: cfg.format_filters(cfg.parse_filters(v)) if key == "filters" else v for key, v in held.items()}
    fixed = {**space.fixed, **values}
    try:
        cfg.from_dict({**fixed, "epochs": space.max_epochs}, source="--set")
    except UsageError as exc:
        raise UsageError(f"--set: {exc}") from None
    listed = sorted(values.keys() & space.point_choices.keys())
    if listed:
        raise UsageError(f"--set {listed[0]}: {space.path} lists it in its points; edit the points instead")
    params = {key: spec for key, spec in space.params.items() if key not in values}
    grid = {key: spec for key, spec in space.grid.items() if key not in values}
    one_point = bool(space.grid) and not grid and not params  # a grid held at one point: one trial
    size = math.prod(len(v) for v in grid.values()) if grid else (1 if one_point else space.num_samples)
    return dataclasses.replace(space, fixed=fixed, params=params, grid=grid, num_samples=size)


class DefineByRun:
    """Optuna define-by-run space of a :class:`Space`: parents first, children only when active.

    A class (not a closure) so that the searcher holding it pickles into Ray's experiment state.
    """

    def __init__(self, space: Space, seed: int = 0):
        self.space = space
        self.seed = seed

    def __call__(self, trial: Any) -> dict[str, Any]:
        """The trial's configuration values: the space's constants and the keys sampled into ``trial``."""
        values = self.space.constants(self.seed)
        listed = {**self.space.point_choices, **self.space.grid}
        for key in self.space.sampled_keys:
            if key not in cfg.active_keys(values):
                continue  # inactive: Optuna never sees it, the trials table leaves it null
            if key in listed:  # every listed point is an enqueued trial: this returns its value
                values[key] = trial.suggest_categorical(key, list(listed[key]))
            else:
                values[key] = self.space.params[key].suggest(trial, key)
        return values


def load(name_or_path: str | Path) -> Space:
    """Read and validate a space; any problem is a :class:`UsageError` naming the file and the key."""
    path = resolve(name_or_path)
    raw = _read_yaml(path)
    return _parse(path, raw)


def is_space_mapping(raw: dict[str, Any]) -> bool:
    """A space file has ``fixed``/``params``/``grid``; a plain training config has vocabulary keys only."""
    return any(key in raw for key in ("fixed", "params", "grid"))


def load_fixed_config(path: str | Path) -> cfg.TrainConfig | None:
    """The training config of a space file with nothing sampled (``seed_best.yaml``); None for a plain config.

    Lets ``train --config search_spaces/seed_best.yaml`` train exactly what the one-trial
    study would, with ``epochs`` taken from ``max_epochs``.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if not is_space_mapping(raw):
        return None
    space = _parse(path, raw)
    if space.params or len(space.grid_points()) > 1:
        sampled = ", ".join(space.sampled_keys)
        raise UsageError(f"{path}: a search space that samples {sampled}; a training config must fix every key")
    return space.trial_config({**space.constants(space.fixed.get("seed", 0)), **(space.grid_points() or [{}])[0]})


def load_config_file(path: str | Path) -> cfg.TrainConfig:
    """``train --config``: a mapping of vocabulary keys, or a space file that fixes every key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    fixed = load_fixed_config(path)
    return fixed if fixed is not None else cfg.load(path)


# -- parsing -----------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    raw = cfg.read_yaml(path, "space file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping, got {type(raw).__name__}")
    return raw


def _parse(path: Path, raw: dict[str, Any]) -> Space:
    def fail(where: str, problem: str) -> UsageError:
        return UsageError(f"{path}: {where}: {problem}")

    _check_known(raw, TOP_KEYS, "top level", fail)
    max_epochs = _positive_int(raw.get("max_epochs", cfg.TrainConfig.epochs), "max_epochs", fail)
    source, subset, val_size = _parse_data(raw, fail)
    concurrent = raw.get("max_concurrent")
    fixed, params, grid = _parse_sections(path, raw, max_epochs, fail)
    points = _parse_points(raw, fixed, params, grid, max_epochs, fail)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", "must be text")
    space = Space(
        name=path.stem,
        path=path,
        description=description.strip(),
        num_samples=len(points) if points else _parse_num_samples(raw, params, grid, fail),
        max_epochs=max_epochs,
        source=source,
        subset=subset,
        val_size=val_size,
        asha=_parse_asha(raw, max_epochs, fail),
        max_concurrent=None if concurrent is None else _positive_int(concurrent, "max_concurrent", fail),
        fixed=fixed,
        params=params,
        grid=grid,
        seeds=_positive_int(raw.get("seeds", 1), "seeds", fail),
        points=points,
        tune=_parse_tune(raw, fixed, params, grid, max_epochs, fail),
    )
    space.repeated(space.seeds)  # a space that cannot be repeated fails here, with the file named
    return space


def _parse_data(raw: dict[str, Any], fail: Any) -> tuple[str, int | None, int | None]:
    """``data:``: the source, the training subset and the validation count."""
    data = _mapping(raw.get("data"), "data", fail)
    _check_known(data, DATA_KEYS, "data", fail)
    source = data.get("source", "cifar10")
    if source not in cfg.DATA_SOURCES:
        raise fail("data.source", f"unknown source {source!r} (choose from {', '.join(cfg.DATA_SOURCES)})")
    subset = None if data.get("subset") is None else _positive_int(data["subset"], "data.subset", fail)
    val_size = data.get("val_size")  # None: a tenth of the training pool
    if val_size is not None:
        val_size = _positive_int(val_size, "data.val_size", fail, minimum=0)
    return source, subset, val_size


def _parse_asha(raw: dict[str, Any], max_epochs: int, fail: Any) -> Asha | None:
    """``asha:``: absent means the defaults, an explicit null no early stopping."""
    if raw.get("asha", {}) is None:
        return None
    spec = _mapping(raw.get("asha"), "asha", fail)
    _check_known(spec, ASHA_KEYS, "asha", fail)
    grace = _positive_int(spec.get("grace_period", 1), "asha.grace_period", fail)
    factor = _positive_int(spec.get("reduction_factor", 3), "asha.reduction_factor", fail, minimum=2)
    if grace > max_epochs:
        raise fail("asha.grace_period", f"{grace} is more than max_epochs {max_epochs}")
    return Asha(grace, factor)


def _parse_sections(
    path: Path, raw: dict[str, Any], max_epochs: int, fail: Any
) -> tuple[dict[str, Any], dict[str, Distribution], dict[str, tuple[Any, ...]]]:
    """``fixed``, ``params`` and ``grid``: each key in one section, and every value a trial could
    get (each extreme of a range, each choice) a valid training config where the key is active."""
    fixed = _mapping(raw.get("fixed"), "fixed", fail)
    params_raw = _mapping(raw.get("params"), "params", fail)
    grid_raw = _mapping(raw.get("grid"), "grid", fail)
    _check_sections(fixed, params_raw, grid_raw, fail)
    fixed = {key: cfg.format_filters(cfg.parse_filters(v)) if key == "filters" else v for key, v in fixed.items()}
    base = {**fixed, "epochs": max_epochs}
    try:
        cfg.from_dict(base, source="fixed")
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    params = {key: _distribution(key, spec, fail) for key, spec in params_raw.items()}
    grid = {key: _grid_values(key, values, fail) for key, values in grid_raw.items()}
    choices = {key: d.values for key, d in params.items() if d.kind == "choice"} | grid
    tried = [("params", k, d.extremes()) for k, d in params.items()] + [("grid", k, v) for k, v in grid.items()]
    for section, key, values in tried:
        where = f"{section}.{key}"
        activating = _activating(key, fixed, choices)
        if activating is None:
            parent, when = cfg.CONDITIONS[key]
            raise fail(where, f"never active: it only matters when {parent} is {' or '.join(map(str, when))}")
        for value in values:
            try:
                cfg.from_dict({**base, **activating, key: value}, source=where)
            except UsageError as exc:
                raise UsageError(f"{path}: {where}: {exc}") from None
    return fixed, params, grid


def _check_sections(fixed: dict[str, Any], params: dict[str, Any], grid: dict[str, Any], fail: Any) -> None:
    for section, keys in (("fixed", fixed), ("params", params), ("grid", grid)):
        for key in keys:
            if key not in cfg.KEYS:
                raise fail(f"{section}.{key}", f"not a configuration key (known keys: {', '.join(cfg.KEYS)})")
            if key == "epochs":
                raise fail(f"{section}.epochs", "set max_epochs instead (every trial's epochs, ASHA's max_t)")
    for key in params:
        if key in fixed:
            raise fail(f"params.{key}", "both fixed and sampled; keep one")
        if key in grid:
            raise fail(f"params.{key}", "both sampled and in the grid; keep one")
    for key in grid:
        if key in fixed:
            raise fail(f"grid.{key}", "both fixed and in the grid; keep one")


def _parse_points(
    raw: dict[str, Any],
    fixed: dict[str, Any],
    params: dict[str, Any],
    grid: dict[str, Any],
    max_epochs: int,
    fail: Any,
) -> tuple[dict[str, Any], ...]:
    """``points:``: explicit configurations over the fixed keys. A point sets every listed key that is
    active for it and none that is inactive, so that the trial runs exactly the point."""
    if raw.get("points") is None:
        return ()
    listed = raw["points"]
    if not isinstance(listed, list) or not listed:
        raise fail("points", f"expected a non-empty list of mappings, got {listed!r}")
    if grid or params:
        raise fail("points", "points list every configuration; drop grid and params")
    if "num_samples" in raw and raw["num_samples"] != len(listed):
        raise fail("num_samples", f"{raw['num_samples']}, but there are {len(listed)} points (omit num_samples)")
    keys = {key for point in listed if isinstance(point, dict) for key in point}
    points = []
    for index, point in enumerate(listed):
        where = f"points[{index}]"
        if not isinstance(point, dict) or not point:
            raise fail(where, f"expected a mapping of configuration keys, got {point!r}")
        for key, value in point.items():
            if key not in cfg.KEYS or key == "epochs":
                raise fail(f"{where}.{key}", "not a configuration key a point can set")
            if key in fixed:
                raise fail(f"{where}.{key}", "both fixed and in a point; keep one")
            if not isinstance(value, (str, int, float, bool)):
                raise fail(f"{where}.{key}", f"values must be scalars, got {value!r}")
        point = {key: cfg.format_filters(cfg.parse_filters(v)) if key == "filters" else v for key, v in point.items()}
        active = cfg.active_keys({**fixed, **point})
        for key in sorted(keys):
            if key in active and key not in point:
                raise fail(where, f"{key} is active here but not set (set it in every point where it is active)")
            if key in point and key not in active:
                raise fail(f"{where}.{key}", "inactive for this point (its parent's value turns it off)")
        try:
            cfg.from_dict({**fixed, "epochs": max_epochs, **point}, source=where)
        except UsageError as exc:
            raise fail(where, str(exc)) from None
        if point in points:
            raise fail(where, f"repeats an earlier point {point!r}")
        points.append(point)
    return tuple(points)


def _parse_tune(
    raw: dict[str, Any],
    fixed: dict[str, Any],
    params: dict[str, Any],
    grid: dict[str, tuple[Any, ...]],
    max_epochs: int,
    fail: Any,
) -> Tuning | None:
    """``tune:``: which keys every grid level gets tuned on its own, with how many trials and seeds."""
    if raw.get("tune") is None:
        return None
    spec = _mapping(raw["tune"], "tune", fail)
    _check_known(spec, TUNE_KEYS, "tune", fail)
    if len(grid) != 1 or params:
        raise fail("tune", "needs a grid of one key (the factor whose levels are tuned each) and no params")
    trials = _positive_int(spec.get("trials", 8), "tune.trials", fail)
    seeds = _positive_int(spec.get("seeds", 5), "tune.seeds", fail, minimum=2)
    tuned_raw = _mapping(spec.get("params"), "tune.params", fail)
    if not tuned_raw:
        raise fail("tune.params", "name at least one key to tune per level")
    (factor,) = grid
    factor_parent = cfg.CONDITIONS.get(factor, (None,))[0]
    if factor_parent in tuned_raw:
        raise fail(f"tune.params.{factor_parent}", f"the grid's {factor} depends on it; tune it elsewhere or vary it")
    tuned = {}
    choices = dict(grid)
    base = {**fixed, "epochs": max_epochs}
    for key, dist in tuned_raw.items():
        where = f"tune.params.{key}"
        if key not in cfg.KEYS or key in ("epochs", "seed"):
            raise fail(where, f"not a configuration key that can be tuned (known keys: {', '.join(cfg.KEYS)})")
        if key in grid:
            raise fail(where, "also in the grid; a factor's levels cannot be tuned per level")
        parent = cfg.CONDITIONS.get(key, (None,))[0]
        if parent in tuned_raw:
            raise fail(where, f"its parent {parent} is tuned too; tune one of them (or make {parent} the grid)")
        tuned[key] = _distribution(key, dist, fail, where=where)
        activating = _activating(key, fixed, choices)
        if activating is None:
            parent, when = cfg.CONDITIONS[key]
            raise fail(where, f"never active: it only matters when {parent} is {' or '.join(map(str, when))}")
        for value in tuned[key].extremes():
            try:
                cfg.from_dict({**base, **activating, key: value}, source=where)
            except UsageError as exc:
                raise fail(where, str(exc)) from None
    return Tuning(trials=trials, seeds=seeds, params=tuned)


def _parse_num_samples(raw: dict[str, Any], params: dict[str, Any], grid: dict[str, tuple[Any, ...]], fail: Any) -> int:
    """A grid runs each combination once; a sampled space 16 trials unless it says otherwise."""
    if grid and params:
        raise fail("grid", "a grid runs every combination; sample with params or list a grid, not both")
    if not grid:
        return _positive_int(raw.get("num_samples", 1 if not params else 16), "num_samples", fail)
    grid_size = math.prod(len(values) for values in grid.values())
    num_samples = raw.get("num_samples", grid_size)
    if num_samples != grid_size:
        raise fail("num_samples", f"{num_samples}, but the grid has {grid_size} combinations (omit num_samples)")
    return num_samples


def _check_known(mapping: dict[str, Any], known: Iterable[str], where: str, fail: Any) -> None:
    known = tuple(known)
    for key in mapping:
        if key not in known:
            raise fail(where, f"unknown key {key!r} (known: {', '.join(known)})")


def _mapping(value: Any, where: str, fail: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(where, f"expected a mapping, got {value!r}")
    return value


def _positive_int(value: Any, where: str, fail: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(where, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str, fail: Any) -> float:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as the number it obviously is."""
    if isinstance(value, bool):
        raise fail(where, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise fail(where, f"expected a number, got {value!r}") from None


def _distribution(key: str, spec: Any, fail: Any, where: str | None = None) -> Distribution:
    where = where or f"params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(where, f"expected one of {{{', '.join(k + ': ...' for k in DISTRIBUTIONS)}}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise fail(where, f"unknown distribution {kind!r} (choose from {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        return Distribution(kind, _grid_values(key, args, fail, where=where))
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise fail(where, f"{kind} takes [low, high], got {args!r}")
    if kind in ("int", "logint"):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in args):
            raise fail(where, f"{kind} takes integer bounds, got {args!r}")
        low, high = args
    else:
        low, high = (_number(v, where, fail) for v in args)
    if low > high:
        raise fail(where, f"low {low} > high {high}")
    if kind in ("loguniform", "logint") and low <= 0:
        raise fail(where, f"{kind} needs low > 0, got {low}")
    return Distribution(kind, (low, high))


def _grid_values(key: str, values: Any, fail: Any, where: str | None = None) -> tuple[Any, ...]:
    where = where or f"grid.{key}"
    if not isinstance(values, (list, tuple)) or not values:
        raise fail(where, f"expected a non-empty list of values, got {values!r}")
    out = []
    for value in values:
        if key == "filters":
            value = cfg.format_filters(cfg.parse_filters(value))  # Optuna choices must be scalars
        if not isinstance(value, (str, int, float, bool)):
            raise fail(where, f"values must be scalars, got {value!r}")
        if cfg.field_type(key) == "float" and not isinstance(value, bool):
            value = _number(value, where, fail)  # 0 as 0.0: the value the trials table will hold
        out.append(value)
    if len(set(map(repr, out))) != len(out):
        raise fail(where, f"repeated values in {out!r}")
    return tuple(out)


def _depth(key: str) -> int:
    return 0 if key not in cfg.CONDITIONS else 1 + _depth(cfg.CONDITIONS[key][0])


def _activating(key: str, fixed: dict[str, Any], choices: dict[str, tuple[Any, ...]]) -> dict[str, Any] | None:
    """Parent values under which ``key`` is active and that the space can produce; None if none can."""
    if key not in cfg.CONDITIONS:
        return {}
    parent, when = cfg.CONDITIONS[key]
    upstream = _activating(parent, fixed, choices)
    if upstream is None:
        return None
    if parent in fixed:
        possible: tuple[Any, ...] = (fixed[parent],)
    elif parent in choices:
        possible = choices[parent]
    else:
        possible = (getattr(cfg.TrainConfig(), parent),)
    for value in possible:
        if value in when:
            return {**upstream, parent: value}
    return None
