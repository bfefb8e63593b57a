"""Optimizers, the L1 subgradient and the lr schedule, against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tune_cifar.config import TrainConfig
from tune_cifar.models import ConditionedCNN
from tune_cifar.optim import LrSchedule, SignSGD, apply_l1, build_optimizer, decayed_parameters


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    "values",
    [
        {"optimizer": "adam", "lr": 1e-2},
        {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-2},
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        {"optimizer": "sign_sgd", "lr": 1e-2, "momentum": 0.0},
        {"optimizer": "sign_sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4},
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
def test_each_optimizer_reduces_a_classification_loss(values: dict) -> None:
    model = tiny_classifier()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = build_optimizer(model, TrainConfig(**values))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_sign_sgd_steps_by_exactly_lr_times_sign() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    optimizer = SignSGD([p], lr=0.25)
    p.grad = torch.tensor([0.3, -1e-6, 0.0, -7.0])
    optimizer.step()
    assert torch.equal(p.detach(), torch.tensor([0.75, -1.75, 3.0, 0.75]))
    assert torch.equal(p.grad, torch.tensor([0.3, -1e-6, 0.0, -7.0]))  # the gradient is left alone


def test_signum_takes_the_sign_of_the_moving_average() -> None:
    p = nn.Parameter(torch.zeros(2))
    optimizer = SignSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, 1.0])
    optimizer.step()  # m = 0.1 * g = [0.1, 0.1]
    assert torch.equal(p.detach(), torch.full((2,), -0.1))
    p.grad = torch.tensor([-0.5, -2.0])
    optimizer.step()  # m = 0.9 * 0.1 + 0.1 * g = [0.04, -0.11]: the first coordinate keeps its sign
    assert torch.allclose(optimizer.state[p]["momentum_buffer"], torch.tensor([0.04, -0.11]))
    assert torch.equal(p.detach(), torch.tensor([-0.1 - 0.1, -0.1 + 0.1]))


def test_sign_sgd_adds_weight_decay_before_the_sign() -> None:
    p = nn.Parameter(torch.tensor([2.0, -2.0]))
    optimizer = SignSGD([p], lr=0.5, weight_decay=1.0)
    p.grad = torch.tensor([-1.0, -1.0])  # g + wd * p = [1, -3]
    optimizer.step()
    assert torch.equal(p.detach(), torch.tensor([1.5, -1.5]))


def test_weight_decay_only_on_weights() -> None:
    model = ConditionedCNN(filters=(4, 4, 4))
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=0.5))
    decayed, other = optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and other["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in other["params"])
    assert len(decayed["params"]) + len(other["params"]) == len(list(model.parameters()))
    assert [id(p) for p in decayed["params"]] == [id(p) for p in decayed_parameters(model, "weights")]
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params <= {id(p) for p in other["params"]}

    # With zero gradients only the decay acts: weights shrink by lr * wd, biases and BN stay put.
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_decay_scope_all_decays_every_parameter_like_adam_over_model_parameters() -> None:
    """The second report's ``Adam(model.parameters(), weight_decay=wd)``: one decayed group holding
    biases and BN scales and shifts too, stepping exactly as that optimizer does."""
    torch.manual_seed(0)
    model = ConditionedCNN(filters=(4, 4, 4))
    reference = copy.deepcopy(model)
    config = TrainConfig(optimizer="adam", lr=0.01, weight_decay=0.5, decay_scope="all")
    optimizer = build_optimizer(model, config)
    assert len(optimizer.param_groups) == 1
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert decayed_parameters(model, "all") == list(model.parameters())
    plain = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=0.5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.full_like(p, 0.1)
        q.grad = torch.full_like(q, 0.1)
    optimizer.step()
    plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name)


def test_apply_l1_adds_l1_times_sign_of_weight() -> None:
    w = nn.Parameter(torch.tensor([[1.5, -0.2], [0.0, 3.0]]))
    no_grad = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.tensor([[0.1, 0.1], [0.1, 0.1]])
    apply_l1([w, no_grad], 0.01)
    torch.testing.assert_close(w.grad, torch.tensor([[0.11, 0.09], [0.1, 0.11]]))
    assert no_grad.grad is None
    apply_l1([w], 0.0)
    torch.testing.assert_close(w.grad, torch.tensor([[0.11, 0.09], [0.1, 0.11]]))


def schedule_for(values: dict, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, LrSchedule]:
    config = TrainConfig(optimizer="sgd", **values)
    optimizer = build_optimizer(nn.Linear(2, 2), config)
    return optimizer, LrSchedule(optimizer, config, steps_per_epoch)


def run_epochs(
    optimizer: torch.optim.Optimizer, schedule: LrSchedule, steps: int, val_losses: list[float]
) -> tuple[list[float], list[float]]:
    """The training loop's calls; returns the lr of every step and the lr after every epoch."""
    step_lrs, epoch_lrs = [], []
    for val_loss in val_losses:
        for _ in range(steps):
            schedule.step_batch()
            step_lrs.append(schedule.lr)
            optimizer.step()
        schedule.step_epoch(val_loss)
        epoch_lrs.append(schedule.lr)
    return step_lrs, epoch_lrs


def test_warmup_rises_linearly_per_step_then_holds() -> None:
    optimizer, schedule = schedule_for({"lr": 0.3, "warmup_epochs": 2, "epochs": 4}, steps_per_epoch=3)
    assert schedule.lr == pytest.approx(0.3 / 6)
    step_lrs, _ = run_epochs(optimizer, schedule, 3, [1.0] * 4)
    assert step_lrs == pytest.approx([0.3 * k / 6 for k in range(1, 7)] + [0.3] * 6)
    assert all(group["lr"] == schedule.lr for group in optimizer.param_groups)


def test_step_scheduler_counts_epochs_after_warmup() -> None:
    values = {"lr": 0.1, "warmup_epochs": 1, "epochs": 6, "scheduler": "step", "step_size": 2, "gamma": 0.5}
    optimizer, schedule = schedule_for(values, steps_per_epoch=2)
    _, epoch_lrs = run_epochs(optimizer, schedule, 2, [1.0] * 6)
    assert epoch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_cosine_reaches_min_lr_at_the_last_epoch() -> None:
    values = {"lr": 0.1, "min_lr": 1e-3, "warmup_epochs": 2, "epochs": 7, "scheduler": "cosine"}
    optimizer, schedule = schedule_for(values, steps_per_epoch=2)
    step_lrs, epoch_lrs = run_epochs(optimizer, schedule, 2, [1.0] * 7)
    assert epoch_lrs[1] == pytest.approx(0.1)  # end of warm-up: the cosine starts from lr
    expected = [1e-3 + (0.1 - 1e-3) * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(1, 6)]
    assert epoch_lrs[2:] == pytest.approx(expected)
    assert epoch_lrs[-1] == pytest.approx(1e-3)
    assert step_lrs[-2:] == pytest.approx([expected[-2]] * 2)  # the last epoch trains one cosine step above


def test_plateau_reduces_after_patience_and_stops_at_min_lr() -> None:
    values = {"lr": 0.1, "epochs": 9, "scheduler": "plateau", "patience": 2, "factor": 0.5, "min_lr": 0.03}
    optimizer, schedule = schedule_for(values, steps_per_epoch=1)
    _, epoch_lrs = run_epochs(optimizer, schedule, 1, [1.0, 0.9, 0.9, 0.9, 0.95, 0.9, 0.9, 0.9, 0.9])
    # epochs 3-4 are the 2 allowed bad epochs, epoch 5 the third: halve; 3 more bad: floor at min_lr.
    assert epoch_lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.03, 0.03])


def test_plateau_with_factor_one_is_constant() -> None:
    optimizer, schedule = schedule_for({"scheduler": "plateau", "patience": 0, "factor": 1.0}, steps_per_epoch=1)
    _, epoch_lrs = run_epochs(optimizer, schedule, 1, [1.0, 2.0, 3.0])
    assert epoch_lrs == [1e-3] * 3


@pytest.mark.parametrize(
    "values",
    [
        {"scheduler": "none", "warmup_epochs": 3},
        {"scheduler": "step", "step_size": 2, "gamma": 0.5, "warmup_epochs": 1},
        {"scheduler": "plateau", "patience": 1, "factor": 0.5, "warmup_epochs": 1},
        {"scheduler": "cosine", "min_lr": 1e-4, "warmup_epochs": 2},
    ],
    ids=lambda v: v["scheduler"],
)
def test_state_dict_round_trip_continues_the_identical_schedule(values: dict) -> None:
    values = {"lr": 0.1, "epochs": 8, **values}
    val_losses = [1.0, 0.9, 0.9, 0.8, 0.8, 0.8, 0.85, 0.7]
    optimizer, schedule = schedule_for(values, steps_per_epoch=2)
    run_epochs(optimizer, schedule, 2, val_losses[:1])
    for _ in range(1):  # stop mid-epoch, inside warm-up for warmup_epochs > 1
        schedule.step_batch()
        optimizer.step()
    checkpoint = copy.deepcopy({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    expected = run_epochs(optimizer, schedule, 2, val_losses[1:])

    fresh_optimizer, fresh = schedule_for(values, steps_per_epoch=2)
    assert run_epochs(fresh_optimizer, fresh, 2, val_losses[1:]) != expected  # the test can fail

    resumed_optimizer, resumed = schedule_for(values, steps_per_epoch=2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["schedule"])
    assert run_epochs(resumed_optimizer, resumed, 2, val_losses[1:]) == expected
