"""Telemetry against statistics computed by hand from the same gradients and weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tune_cifar.config import TrainConfig
from tune_cifar.models import build_model
from tune_cifar.telemetry import Telemetry, count_macs, layer_health, worst_health


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def step(model: nn.Module, telemetry: Telemetry, optimizer: torch.optim.Optimizer, scale: float = 1.0):
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    optimizer.zero_grad()
    (scale * nn.functional.cross_entropy(model(x), y)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    telemetry.record_step()
    optimizer.step()
    return grads


def test_epoch_rows_match_hand_computed_statistics():
    model = tiny_model()
    telemetry = Telemetry(model)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = [step(model, telemetry, optimizer) for _ in range(3)]
    rows = telemetry.end_epoch(epoch=1)

    assert [row["layer"] for row in rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for i, (row, p, p0) in enumerate(zip(rows, model.parameters(), start, strict=True)):
        grads = [g[i] for g in steps]
        assert row["numel"] == p.numel()
        assert row["grad_mean_abs"] == pytest.approx(sum(g.abs().mean().item() for g in grads) / 3, rel=1e-5)
        assert row["grad_max_abs"] == pytest.approx(sum(g.abs().max().item() for g in grads) / 3, rel=1e-5)
        assert row["grad_l2"] == pytest.approx(sum(g.norm().item() for g in grads) / 3, rel=1e-5)
        assert row["weight_l2"] == pytest.approx(p.norm().item(), rel=1e-5)
        assert row["update_l2"] == pytest.approx((p - p0).norm().item(), rel=1e-5)
        assert row["update_ratio"] == pytest.approx(row["update_l2"] / row["weight_l2"], rel=1e-6)


def test_second_epoch_measures_only_its_own_update_and_steps():
    model = tiny_model()
    telemetry = Telemetry(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model, telemetry, optimizer, scale=100.0)
    telemetry.end_epoch(1)
    after_first = [p.detach().clone() for p in model.parameters()]
    grads = step(model, telemetry, optimizer)
    rows = telemetry.end_epoch(2)
    for row, p, p0, g in zip(rows, model.parameters(), after_first, grads, strict=True):
        assert row["update_l2"] == pytest.approx((p - p0).norm().item(), rel=1e-5)
        assert row["grad_l2"] == pytest.approx(g.norm().item(), rel=1e-5)


def test_state_dict_resumes_mid_epoch_accumulation():
    model = tiny_model()
    telemetry = Telemetry(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model, telemetry, optimizer)
    restored = Telemetry(model)
    restored.load_state_dict(telemetry.state_dict())
    assert restored.end_epoch(1) == telemetry.end_epoch(1)


def test_health_flags():
    assert layer_health(0.5, "weight") == "ok"
    assert layer_health(1e-9, "weight") == "vanishing"
    assert layer_health(1e-9, "bias") == "ok"  # a conv bias under BN has zero gradient by design
    assert layer_health(1e4, "norm") == "exploding"
    assert layer_health(math.nan, "weight") == "exploding"
    assert worst_health(["ok", "exploding", "vanishing"]) == "exploding"
    assert worst_health([]) == "ok"


def test_exploding_gradients_are_flagged_in_rows():
    model = tiny_model()
    telemetry = Telemetry(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step(model, telemetry, optimizer, scale=1e6)
    assert "exploding" in {row["health"] for row in telemetry.end_epoch(1)}


def test_thop_counts_of_the_first_reports_network():
    assert count_macs(build_model(TrainConfig(model="small_cnn"))) == (6_654_464, 1_070_794)


def test_thop_counts_scale_with_filter_widths():
    narrow, _ = count_macs(build_model(TrainConfig(filters=(8, 16, 32))))
    wide, _ = count_macs(build_model(TrainConfig(filters=(16, 32, 64))))
    assert 2 < wide / narrow < 4.5  # conv MACs grow ~4x with width, the fixed-size head less


def test_thop_profiles_each_architecture_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that runs many trials counts MACs once per architecture: later trials of the same
    network get the same count without THOP running again (a spy around the real thop.profile)."""
    import thop

    from tune_cifar import telemetry

    calls = []
    real = thop.profile
    monkeypatch.setattr(thop, "profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(telemetry, "_MACS", {})
    config = TrainConfig(filters=(8, 16, 32))
    first = count_macs(build_model(config))
    again = count_macs(build_model(TrainConfig(filters=(8, 16, 32), lr=0.5, seed=3)))  # same network, new trial
    assert again == first and len(calls) == 1
    other = count_macs(build_model(TrainConfig(filters=(8, 16, 32), batchnorm=False)))
    assert len(calls) == 2 and other[0] != first[0]


def test_rows_carry_forward_order_and_tensor_kind():
    """Analysis orders layers and judges vanishing from these columns alone, without torch."""
    model = build_model(TrainConfig(filters=(8, 16, 32)))
    telemetry = Telemetry(model)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    telemetry.record_step()
    rows = telemetry.end_epoch(1)
    names = [name for name, _ in model.named_parameters()]
    assert [row["layer"] for row in sorted(rows, key=lambda row: row["layer_index"])] == names
    kinds = {row["layer"]: row["kind"] for row in rows}
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {kinds[f"{n}.weight"] for n in convs} == {"weight"}
    assert {kinds[f"{n}.weight"] for n in norms} == {kinds[f"{n}.bias"] for n in norms} == {"norm"}
    assert {kinds[f"{n}.bias"] for n in convs if f"{n}.bias" in kinds} <= {"bias"}
