"""The training loop on small synthetic data: it learns, resumes exactly, probes without side effects."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tune_cifar.config import TrainConfig
from tune_cifar.data import Splits, load_splits
from tune_cifar.engine import Trainer
from tune_cifar.tables import SCHEMAS
from tune_cifar.train import merge_validation

NARROW = {"filters": (8, 16, 32), "batch_size": 64}


@pytest.fixture(scope="module")
def splits() -> Splits:
    return load_splits("synthetic", subset=1200, seed=0)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_learns_synthetic_classes_and_reports_table_rows(splits):
    trainer = Trainer(TrainConfig(model="small_cnn", epochs=3, batch_size=64), splits)
    reports = [trainer.train_epoch() for _ in range(3)]
    last = reports[-1].epoch
    assert last["val_acc"] > 0.3  # chance is 0.1
    assert last["train_loss"] < reports[0].epoch["train_loss"]
    assert set(last) == set(SCHEMAS["epochs"].names) - {"trial_id"}
    assert {row["layer"] for row in reports[0].layers} == {name for name, _ in trainer.model.named_parameters()}
    assert all(set(row) == set(SCHEMAS["layers"].names) - {"trial_id"} for row in reports[0].layers)
    summary = trainer.finish()
    assert summary["epochs_run"] == 3
    assert summary["best_val_acc"] == max(report.epoch["val_acc"] for report in reports)
    assert (summary["macs"], summary["params"]) == (6_654_464, 1_070_794)
    test = trainer.evaluate_test()
    assert 0.0 <= test["test_acc"] <= 1.0 and math.isfinite(test["test_loss"])


def test_resume_from_state_dict_continues_identically(splits):
    config = TrainConfig(**NARROW, epochs=2, dropout=0.3, scheduler="cosine", warmup_epochs=1, optimizer="sgd")
    straight = Trainer(config, splits)
    straight.train_epoch()
    state = copy.deepcopy(straight.state_dict())  # a checkpoint is a snapshot; state_dict holds live tensors
    expected = straight.train_epoch()

    resumed = Trainer(config, splits)
    resumed.load_state_dict(state)
    got = resumed.train_epoch()
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert got.epoch[key] == expected.epoch[key], key
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
    assert [row["grad_l2"] for row in got.layers] == [row["grad_l2"] for row in expected.layers]


def test_probe_records_steps_and_leaves_training_untouched(splits):
    # the probe saves and restores whatever the model has (weights, gradients, BN statistics): a
    # narrow CNN with BN shows it as well as VGG-A, whose three probed steps took about a minute
    config = TrainConfig(filters=(8, 16, 32), batchnorm=True, batch_size=128, epochs=1, probe_every=3)
    small = Splits(
        splits.train_x[:384],
        splits.train_y[:384],
        splits.val_x[:50],
        splits.val_y[:50],
        splits.test_x,
        splits.test_y,
        "synthetic",
    )
    probed = Trainer(config, small)
    report = probed.train_epoch()
    plain = Trainer(config.replace(probe_every=0), small)
    plain_report = plain.train_epoch()

    assert [row["step"] for row in report.steps] == [1, 2, 3]
    probe = report.steps[2]
    for key in ("probe_loss_min", "probe_loss_max", "probe_grad_change", "probe_beta"):
        assert math.isfinite(probe[key]) and probe[key] > 0, key
    assert probe["probe_loss_min"] <= report.steps[2]["train_loss"] <= probe["probe_loss_max"]
    assert "probe_beta" not in report.steps[0]
    assert plain_report.steps == []
    # the probe restores weights, gradients and BN statistics: training is bit-identical
    for a, b in zip(weights(probed), weights(plain), strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(probed.model.named_buffers(), plain.model.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_swa_averages_the_last_epochs(splits):
    trainer = Trainer(TrainConfig(**NARROW, epochs=2, swa_epochs=2), splits)
    trainer.train_epoch()
    trainer.train_epoch()
    summary = trainer.finish()
    assert trainer.final_model() is trainer.swa_model.module
    assert trainer.swa_model.n_averaged.item() == 2
    assert summary["final_val_acc"] == trainer.final_val["val_acc"]
    assert summary["final_val_acc"] is not None


def test_training_on_train_plus_validation_has_no_validation_columns(splits):
    merged = merge_validation(splits)
    assert len(merged.train_y) == len(splits.train_y) + len(splits.val_y) and len(merged.val_y) == 0
    trainer = Trainer(TrainConfig(**NARROW, epochs=1, scheduler="plateau"), merged)
    report = trainer.train_epoch()
    assert report.epoch["val_acc"] is None and report.epoch["val_loss"] is None
    assert trainer.finish()["best_val_acc"] is None
    assert 0.0 <= trainer.evaluate_test()["test_acc"] <= 1.0


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "sign_sgd", "momentum": 0.9, "lr": 1e-3, "loss": "focal"},
        {"optimizer": "adamw", "weight_decay": 0.05, "loss": "mse", "activation": "elu"},
        {"optimizer": "sgd", "nesterov": True, "loss": "label_smoothing", "scheduler": "step", "step_size": 1},
        {"activation": "leaky_relu", "l1": 1e-4, "grad_clip": 0.5, "batchnorm": False, "dropout": 0.5},
    ],
)
def test_every_vocabulary_choice_trains(splits, changes):
    trainer = Trainer(TrainConfig(**NARROW, epochs=1, **changes), splits)
    before = weights(trainer)
    row = trainer.train_epoch().epoch
    assert math.isfinite(row["train_loss"]) and 0 <= row["val_acc"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(trainer), strict=True))


def test_epoch_row_holds_the_rates_the_epoch_trained_with(splits):
    """``lr`` is the epoch's first step's rate and ``lr_last`` its last step's, never the next epoch's."""
    config = TrainConfig(**NARROW, epochs=2, lr=0.002, scheduler="cosine", min_lr=1e-6)
    trainer = Trainer(config, splits)
    first, second = trainer.train_epoch().epoch, trainer.train_epoch().epoch
    assert first["lr"] == first["lr_last"] == 0.002  # the old code showed the next epoch's 0.001
    assert second["lr"] == second["lr_last"] == pytest.approx((0.002 + 1e-6) / 2)  # not the floor it never used
    warm = Trainer(TrainConfig(**NARROW, epochs=2, lr=0.01, warmup_epochs=1), splits)
    steps = len(warm.train_loader)
    row = warm.train_epoch().epoch
    assert row["lr"] == pytest.approx(0.01 / steps) and row["lr_last"] == pytest.approx(0.01)
