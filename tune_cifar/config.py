"""The configuration vocabulary: one set of names for config files, search spaces and Parquet columns.

A :class:`TrainConfig` is everything that decides how one network is trained. The same
keys appear in ``--config`` YAML files, in ``search_spaces/*.yaml`` and as columns of the
``trials`` table, so a row of the table is enough to rebuild a trial.

Some keys only mean something under another choice (``momentum`` under SGD, ``focal_gamma``
under the focal loss). :func:`active_keys` is the single place that knows which; the search
samples only active keys and the ``trials`` table leaves inactive ones null.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tune_cifar.errors import UsageError

MODELS = ("small_cnn", "conditioned_cnn", "vgg_a")
ACTIVATIONS = ("relu", "leaky_relu", "elu")
OPTIMIZERS = ("adam", "adamw", "sgd", "sign_sgd")
SCHEDULERS = ("none", "step", "plateau", "cosine")
LOSSES = ("cross_entropy", "focal", "mse", "label_smoothing")
PRECISIONS = ("auto", "fp32", "bf16")  # see tune_cifar.precision
INITS = ("torch", "kaiming")  # see tune_cifar.models.initialise
DECAY_SCOPES = ("weights", "all")  # see tune_cifar.optim.decayed_parameters
DATA_SOURCES = ("cifar10", "synthetic")  # what --data and a space's data.source may name

# small_cnn and vgg_a are fixed architectures (the first report's network, VGG-A); only the
# conditioned CNN has configurable widths.
DEFAULT_FILTERS = {"small_cnn": (), "conditioned_cnn": (64, 128, 256), "vgg_a": ()}
# The small CNN keeps PyTorch's default init, as the first report trained it; the deeper networks
# default to Kaiming-normal, which keeps VGG-A without batch norm trainable (see models.py).
DEFAULT_INIT = {"small_cnn": "torch", "conditioned_cnn": "kaiming", "vgg_a": "kaiming"}


@dataclass(frozen=True)
class TrainConfig:
    """How one network is trained. Every field has a documented default (see README)."""

    model: str = "conditioned_cnn"
    filters: tuple[int, ...] | None = None  # None: the model's own widths (DEFAULT_FILTERS)
    batchnorm: bool = True
    activation: str = "relu"
    activation_slope: float = 0.01  # negative slope of leaky_relu
    init: str | None = None  # torch (PyTorch's defaults) or kaiming; None: the model's own (DEFAULT_INIT)
    dropout: float = 0.0  # in the fully connected head
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_scope: str = "weights"  # what weight decay and L1 act on: weights (ndim > 1) or all parameters
    momentum: float = 0.9  # SGD momentum, or sign-SGD's sign-of-momentum (0 = plain sign of g)
    nesterov: bool = False
    l1: float = 0.0  # L1 penalty on all weights, added to the gradient
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 = off
    scheduler: str = "none"
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    patience: int = 5  # plateau: epochs without val-loss improvement
    factor: float = 0.1  # plateau: decay factor
    min_lr: float = 0.0  # cosine floor and plateau floor
    warmup_epochs: int = 0  # linear warm-up, per step, before the scheduler takes over
    loss: str = "cross_entropy"
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    label_smoothing: float = 0.1
    augment: bool = True  # random crop (pad 4) + horizontal flip
    batch_size: int = 128
    epochs: int = 25
    swa_epochs: int = 0  # average the weights of the last N epochs (SWA); 0 = off
    seed: int = 0
    probe_every: int = 0  # loss-landscape probe every N optimizer steps, with a ``steps`` table; 0 = off
    precision: str = "auto"  # auto (the fastest candidate, measured: tune_cifar.calibration), fp32, bf16

    def __post_init__(self) -> None:
        if self.filters is None:
            object.__setattr__(self, "filters", DEFAULT_FILTERS.get(self.model, ()))
        if self.init is None:
            object.__setattr__(self, "init", DEFAULT_INIT.get(self.model, "kaiming"))
        _validate(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some keys changed, validated like a fresh config."""
        return from_dict({**to_dict(self), **changes})


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
# "str | None" is a str whose None means "the model's own" (filters, init): stored resolved.
_FIELD_TYPES = {f.name: f.type.removesuffix(" | None") for f in dataclasses.fields(TrainConfig)}


def field_type(key: str) -> str:
    """A key's value type as the dataclass spells it: ``"int"``, ``"float"``, ``"bool"``, ``"str"``,
    or ``"tuple[int, ...]"`` for filters. Schemas, spaces and analysis ask here."""
    return _FIELD_TYPES[key]


# key -> (the key it depends on, the values of that key under which it is active). A key is
# active when its parent is active and holds one of those values.
CONDITIONS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "filters": ("model", ("conditioned_cnn",)),
    "batchnorm": ("model", ("conditioned_cnn", "vgg_a")),
    "activation": ("model", ("conditioned_cnn",)),
    "dropout": ("model", ("conditioned_cnn",)),
    "activation_slope": ("activation", ("leaky_relu",)),
    "momentum": ("optimizer", ("sgd", "sign_sgd")),
    "nesterov": ("optimizer", ("sgd",)),
    "step_size": ("scheduler", ("step",)),
    "gamma": ("scheduler", ("step",)),
    "patience": ("scheduler", ("plateau",)),
    "factor": ("scheduler", ("plateau",)),
    "min_lr": ("scheduler", ("plateau", "cosine")),
    "focal_alpha": ("loss", ("focal",)),
    "focal_gamma": ("loss", ("focal",)),
    "label_smoothing": ("loss", ("label_smoothing",)),
}


def active_keys(values: dict[str, Any]) -> set[str]:
    """The keys that change training, given the categorical choices in ``values``.

    Missing parents take their defaults, so this works on partial dicts (search spaces).
    """
    defaults = to_dict(TrainConfig())

    def is_active(key: str) -> bool:
        if key not in CONDITIONS:
            return True
        parent, when = CONDITIONS[key]
        return is_active(parent) and values.get(parent, defaults[parent]) in when

    return {key for key in KEYS if is_active(key)}


def format_filters(filters: tuple[int, ...]) -> str:
    """Filters as one string, ``"64,128,256"``: the form Optuna and Parquet hold."""
    return ",".join(str(width) for width in filters)


def parse_filters(value: Any) -> tuple[int, ...]:
    """Accept ``[64, 128, 256]`` or ``"64,128,256"``."""
    items = value.split(",") if isinstance(value, str) and value else value
    try:
        widths = tuple(item if isinstance(item, int) else float(item) for item in items)
    except (TypeError, ValueError):
        widths = None
    if widths is None or any(isinstance(w, bool) or not float(w).is_integer() for w in widths):
        raise UsageError(f"filters: expected a list of integers like 64,128,256, got {value!r}")
    return tuple(int(w) for w in widths)  # () for the fixed architectures; _validate checks the count


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain dict of every key (filters as a tuple)."""
    return {key: getattr(config, key) for key in KEYS}


def to_row(config: TrainConfig) -> dict[str, Any]:
    """The ``trials`` table's hyperparameter columns: inactive keys are None, filters a string."""
    active = active_keys(to_dict(config))
    row = {key: (getattr(config, key) if key in active else None) for key in KEYS}
    if row["filters"] is not None:
        row["filters"] = format_filters(config.filters)
    return row


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and validate a config; unknown keys and wrong types are a :class:`UsageError`."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(KEYS)})")
    coerced = {key: _coerce(key, value, source) for key, value in values.items() if value is not None}
    return TrainConfig(**coerced)


def from_values(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """The configuration among ``values`` that may hold more than the vocabulary: a Ray trial's
    config, a ``trials`` row as pandas reads it. Other keys are ignored, nulls (None, NaN) are
    inactive keys, numpy scalars become Python ones."""
    kept = {}
    for key in KEYS:
        value = values.get(key)
        value = value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
        if not _is_null(value):
            kept[key] = value
    return from_dict(kept, source=source)


def _is_null(value: Any) -> bool:
    """None, NaN, or pandas' NA (nullable columns), without importing pandas."""
    return value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and value != value)


def from_row(row: Mapping[str, Any]) -> TrainConfig:
    """The configuration of a ``trials`` row."""
    return from_values(row, source=f"trial {row['trial_id']}" if row.get("trial_id") is not None else "trial")


def parse_assignments(assignments: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["filters=32,64,128", "lr=0.01"]`` as vocabulary values (YAML scalars; filters as written).

    ``epochs``, ``seed`` and ``precision`` have flags of their own and are refused here.
    """
    held: dict[str, Any] = {}
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UsageError(f"{flag} {assignment!r}: expected KEY=VALUE, e.g. {flag} filters=32,64,128")
        if key not in KEYS or key in ("epochs", "seed", "precision"):
            hint = "use --epochs, --seed or --precision" if key in KEYS else f"known keys: {', '.join(KEYS)}"
            raise UsageError(f"{flag} {key}: not a key {flag} can hold ({hint})")
        try:
            held[key] = text if key == "filters" else yaml.safe_load(text)
        except yaml.YAMLError:
            raise UsageError(f"{flag} {key}: cannot read the value {text!r}") from None
    return held


def read_yaml(path: str | Path, what: str = "a YAML file") -> Any:
    """The parsed content of a YAML file; a missing or unreadable file is a one-line :class:`UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load(path: str | Path) -> TrainConfig:
    """Read a YAML config file (a mapping of vocabulary keys)."""
    values = read_yaml(path, "config file") or {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return from_dict(values, source=str(path))


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = _FIELD_TYPES[key]
    if key == "filters":
        return parse_filters(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise UsageError(f"{source}: {key} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{source}: {key} must be an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"{source}: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{source}: {key} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise UsageError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {key} {value!r} (choose from {', '.join(choices)})")


def _check_range(key: str, value: float, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if below or value > high or value != value:
        bracket = "(" if low_open else "["
        raise UsageError(f"{key} must be in {bracket}{low}, {high}], got {value}")


def _validate(config: TrainConfig) -> None:
    _check_choice("model", config.model, MODELS)
    _check_choice("activation", config.activation, ACTIVATIONS)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("scheduler", config.scheduler, SCHEDULERS)
    _check_choice("loss", config.loss, LOSSES)
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("init", config.init, INITS)
    _check_choice("decay_scope", config.decay_scope, DECAY_SCOPES)
    expected_filters = len(DEFAULT_FILTERS[config.model])
    if len(config.filters) != expected_filters:
        raise UsageError(
            f"filters: {config.model} takes {expected_filters} widths, got {format_filters(config.filters)!r}"
        )
    if any(width < 1 for width in config.filters):
        raise UsageError(f"filters must be positive, got {format_filters(config.filters)!r}")
    _check_range("lr", config.lr, 0.0, 10.0, low_open=True)
    _check_range("activation_slope", config.activation_slope, 0.0, 1.0)
    _check_range("dropout", config.dropout, 0.0, 0.99)
    for key in ("weight_decay", "l1", "grad_clip", "min_lr", "focal_alpha", "focal_gamma"):
        _check_range(key, getattr(config, key), 0.0)
    _check_range("momentum", config.momentum, 0.0, 0.999)
    _check_range("gamma", config.gamma, 0.0, 1.0, low_open=True)
    _check_range("factor", config.factor, 0.0, 1.0, low_open=True)
    _check_range("label_smoothing", config.label_smoothing, 0.0, 0.99)
    _check_range("step_size", config.step_size, 1)
    _check_range("patience", config.patience, 0)
    _check_range("batch_size", config.batch_size, 1, 65536)
    _check_range("epochs", config.epochs, 1)
    _check_range("warmup_epochs", config.warmup_epochs, 0, config.epochs - 1)
    _check_range("swa_epochs", config.swa_epochs, 0, config.epochs)
    _check_range("seed", config.seed, 0)
    _check_range("probe_every", config.probe_every, 0)
    if config.optimizer == "sgd" and config.nesterov and config.momentum == 0.0:
        raise UsageError("nesterov needs momentum > 0")
