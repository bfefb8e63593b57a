"""Search-space files: the built-ins load, bad files fail with the file and key named, and the
define-by-run sampler only ever samples keys that are active under the values sampled before."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tune_cifar import config as cfg
from tune_cifar import spaces
from tune_cifar.errors import UsageError

GOOD = """
description: a test space
num_samples: 4
max_epochs: 3
data: {source: synthetic, subset: 200}
asha: {grace_period: 1, reduction_factor: 2}
fixed: {model: conditioned_cnn, batch_size: 32}
params:
  optimizer: {choice: [adam, sgd]}
  lr: {loguniform: [1.0e-3, 1.0e-1]}
  momentum: {uniform: [0.8, 0.99]}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_spaces_load() -> None:
    names = spaces.builtin_names()
    assert {
        "full",
        "smoke",
        "seed_best",
        "grid_optimizers",
        "grid_schedulers",
        "grid_losses",
        "grid_activations",
    } <= set(names)
    for name in names:
        space = spaces.load(name)
        assert space.num_samples >= 1 and space.max_epochs >= 1


def test_full_and_smoke_sizes() -> None:
    full = spaces.load("full")
    assert full.max_epochs == 100 and full.asha is not None and full.source == "cifar10"
    assert {"optimizer", "lr", "momentum", "scheduler", "loss", "focal_gamma", "activation", "activation_slope"} <= set(
        full.params
    )
    smoke = spaces.load("smoke")
    assert smoke.source == "synthetic" and smoke.max_epochs <= 4 and smoke.num_samples <= 8
    assert smoke.asha is not None and smoke.asha.grace_period == 1
    assert set(smoke.params["filters"].values) <= {"8,16,32", "16,32,64"}


def test_grids_run_each_value_once() -> None:
    grid = spaces.load("grid_optimizers")
    assert grid.asha is None and not grid.params
    assert [point["optimizer"] for point in grid.grid_points()] == ["adam", "adamw", "sgd", "sign_sgd"]
    assert grid.num_samples == 4
    assert spaces.load("grid_losses").num_samples == 4
    assert spaces.load("grid_activations").num_samples == 3


def test_seed_best_is_also_a_training_config() -> None:
    config = spaces.load_config_file(spaces.spaces_dir() / "seed_best.yaml")
    assert config.filters == (128, 256, 512) and config.activation == "leaky_relu" and config.activation_slope == 0.05
    assert config.lr == 0.002 and config.loss == "label_smoothing" and config.label_smoothing == 0.15
    assert config.scheduler == "cosine" and config.min_lr == 1e-6 and config.epochs == 100 and config.dropout == 0.4


def test_plain_config_file_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer: sgd\nlr: 0.05\nepochs: 2\n", "plain.yaml")
    assert spaces.load_fixed_config(path) is None
    assert spaces.load_config_file(path).optimizer == "sgd"


def test_a_sampling_space_is_not_a_training_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="samples optimizer, lr, momentum"):
        spaces.load_config_file(write(tmp_path, GOOD))


def test_user_path_and_unknown_name(tmp_path: Path) -> None:
    assert spaces.load(write(tmp_path, GOOD)).num_samples == 4
    with pytest.raises(UsageError, match=r"unknown space 'nope'.*smoke"):
        spaces.load("nope")
    with pytest.raises(UsageError, match="not found"):
        spaces.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("num_samples: 4", "num_sample: 4", r"top level: unknown key 'num_sample'"),
        ("  lr: {loguniform", "  learning_rate: {loguniform", r"params.learning_rate: not a configuration key"),
        ("{loguniform: [1.0e-3, 1.0e-1]}", "{lognormal: [1.0e-3, 1.0e-1]}", r"params.lr: unknown distribution"),
        ("{loguniform: [1.0e-3, 1.0e-1]}", "{loguniform: [1.0e-1, 1.0e-3]}", r"params.lr: low 0.1 > high 0.001"),
        ("{loguniform: [1.0e-3, 1.0e-1]}", "{loguniform: [0, 1.0e-1]}", r"params.lr: loguniform needs low > 0"),
        ("{loguniform: [1.0e-3, 1.0e-1]}", "{uniform: [1.0e-3]}", r"params.lr: uniform takes \[low, high\]"),
        ("{loguniform: [1.0e-3, 1.0e-1]}", "{loguniform: [1.0e-3, 20.0]}", r"params.lr: lr must be in"),
        ("batch_size: 32}", "batch_size: 32, lr: 0.1}", r"params.lr: both fixed and sampled"),
        ("[adam, sgd]", "[adam, sgdd]", r"params.optimizer: unknown optimizer 'sgdd'"),
        ("[adam, sgd]", "[adam, adamw]", r"params.momentum: never active: it only matters when optimizer is sgd"),
        ("batch_size: 32}", "batch_size: 32, epochs: 5}", r"fixed.epochs: set max_epochs instead"),
        ("batch_size: 32}", "batch_size: 0}", r"batch_size must be in"),
        ("source: synthetic", "source: imagenet", r"data.source: unknown source 'imagenet'"),
        ("grace_period: 1", "grace_period: 9", r"asha.grace_period: 9 is more than max_epochs 3"),
        ("reduction_factor: 2", "reduction_factor: 1", r"asha.reduction_factor: expected an integer >= 2"),
        ("asha: {", "asha: {rungs: 3, ", r"asha: unknown key 'rungs'"),
        ("max_epochs: 3", "max_epochs: three", r"max_epochs: expected an integer"),
    ],
)
def test_malformed_space_names_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(UsageError, match=message) as caught:
        spaces.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_grid_problems(tmp_path: Path) -> None:
    base = "max_epochs: 2\nasha: null\nfixed: {model: conditioned_cnn}\n"
    with pytest.raises(UsageError, match=r"grid\.optimizer: repeated values"):
        spaces.load(write(tmp_path, base + "grid: {optimizer: [adam, adam]}\n"))
    with pytest.raises(UsageError, match="num_samples: 5, but the grid has 2"):
        spaces.load(write(tmp_path, base + "num_samples: 5\ngrid: {optimizer: [adam, sgd]}\n"))
    with pytest.raises(UsageError, match=r"grid\.model: both fixed and in the grid"):
        spaces.load(write(tmp_path, base + "grid: {model: [vgg_a]}\n"))
    with pytest.raises(UsageError, match="not both"):
        spaces.load(write(tmp_path, base + "grid: {optimizer: [adam]}\nparams: {lr: {uniform: [0.01, 0.1]}}\n"))


def test_bad_yaml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not valid YAML") as caught:
        spaces.load(write(tmp_path, "params: {lr: [1, 2\n"))
    assert "\n" not in str(caught.value)


def test_define_by_run_samples_only_active_keys() -> None:
    """Parents first; a child is sampled exactly when its parent's sampled value activates it."""
    space = spaces.load("full")
    sampler = spaces.DefineByRun(space, seed=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen_optimizers, seen_momentum = set(), 0
    for _ in range(60):
        trial = study.ask()
        constants = sampler(trial)
        values = {**constants, **trial.params}
        active = cfg.active_keys(values)
        assert set(trial.params) == active & set(space.params), trial.params
        assert constants["epochs"] == 100 and constants["seed"] == 3 and constants["model"] == "conditioned_cnn"
        config = space.trial_config(values)  # every sample is a valid training config
        row = cfg.to_row(config)
        for key in set(space.params) - set(trial.params):
            assert row[key] is None, key  # inactive: null in the trials table
        seen_optimizers.add(trial.params["optimizer"])
        seen_momentum += "momentum" in trial.params
        study.tell(trial, 0.0)
    assert seen_optimizers == {"adam", "adamw", "sgd", "sign_sgd"}
    assert 0 < seen_momentum < 60


def test_grid_points_are_enqueued_values() -> None:
    space = spaces.load("grid_schedulers")
    study = optuna.create_study(direction="maximize")
    for point in space.grid_points():
        study.enqueue_trial(point)
    sampled = []
    for _ in space.grid_points():
        trial = study.ask()
        spaces.DefineByRun(space)(trial)
        sampled.append(trial.params["scheduler"])
        study.tell(trial, 0.0)
    assert sampled == ["none", "step", "plateau", "cosine"]


def test_seeds_repeat_every_grid_point_and_the_fixed_config(tmp_path: Path) -> None:
    base = "max_epochs: 2\nasha: null\nfixed: {model: conditioned_cnn}\n"
    grid = spaces.load(write(tmp_path, base + "seeds: 3\ngrid: {optimizer: [adam, sgd]}\n"))
    assert grid.seeds == 3 and grid.num_samples == 2  # as written; the study repeats it
    repeated = grid.repeated(grid.seeds, first_seed=5)
    assert repeated.num_samples == 6
    points = {(p["optimizer"], p["seed"]) for p in repeated.grid_points()}
    assert points == {(o, s) for o in ("adam", "sgd") for s in (5, 6, 7)}
    fixed = spaces.load("seed_best").repeated(3)
    assert fixed.num_samples == 3 and [p["seed"] for p in fixed.grid_points()] == [0, 1, 2]
    configs = {fixed.trial_config({**fixed.constants(), **p}).seed for p in fixed.grid_points()}
    assert configs == {0, 1, 2}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("seeds: 2\nparams: {lr: {uniform: [0.01, 0.1]}}\n", "only a grid or a fixed configuration can be repeated"),
        ("seeds: 2\ngrid: {seed: [0, 1]}\n", "the space sets seed itself"),
        ("seeds: 0\n", "seeds: expected an integer >= 1"),
    ],
)
def test_seeds_problems_name_the_file(tmp_path: Path, extra: str, message: str) -> None:
    path = write(tmp_path, "max_epochs: 2\nasha: null\nfixed: {model: conditioned_cnn}\n" + extra)
    with pytest.raises(UsageError, match=message) as caught:
        spaces.load(path)
    assert str(path) in str(caught.value)


def test_hold_fixes_a_sampled_or_grid_key_and_validates_it() -> None:
    full = spaces.hold(spaces.load("full"), {"filters": "32,64,128", "batchnorm": True})
    assert "filters" not in full.params and full.fixed["filters"] == "32,64,128" and full.num_samples == 64
    grid = spaces.hold(spaces.load("grid_optimizers"), {"filters": [16, 32, 64]})
    assert grid.fixed["filters"] == "16,32,64" and grid.num_samples == 4
    assert spaces.hold(spaces.load("grid_optimizers"), {"optimizer": "sgd"}).num_samples == 1
    with pytest.raises(UsageError, match="--set: unknown optimizer 'lbfgs'"):
        spaces.hold(spaces.load("full"), {"optimizer": "lbfgs"})
