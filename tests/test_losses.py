"""The four losses: reductions to known cases, gradients, extreme logits, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tune_cifar.config import LOSSES, TrainConfig
from tune_cifar.losses import CrossEntropy, FocalLoss, SquareLoss, build_loss


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 10, generator=generator) * 3, torch.randint(0, 10, (16,), generator=generator)


def test_build_loss_dispatch() -> None:
    kinds = {"cross_entropy": CrossEntropy, "label_smoothing": CrossEntropy, "focal": FocalLoss, "mse": SquareLoss}
    assert set(kinds) == set(LOSSES)
    for name, kind in kinds.items():
        assert type(build_loss(TrainConfig(loss=name))) is kind


def test_cross_entropy_matches_torch(batch) -> None:
    logits, targets = batch
    loss = build_loss(TrainConfig(loss="cross_entropy"))(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_label_smoothing_is_the_reports_formula(batch) -> None:
    """The second report's LabelSmoothingCrossEntropy: (1 - s) * NLL + s * mean over classes of -log p."""
    logits, targets = batch
    log_p = F.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    expected = (0.85 * nll + 0.15 * -log_p.mean(dim=1)).mean()
    loss = build_loss(TrainConfig(loss="label_smoothing", label_smoothing=0.15))
    torch.testing.assert_close(loss(logits, targets), expected)


def test_label_smoothing_matches_torch(batch) -> None:
    logits, targets = batch
    loss = build_loss(TrainConfig(loss="label_smoothing", label_smoothing=0.2))(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=0.2))
    assert not torch.allclose(loss, F.cross_entropy(logits, targets))


def test_focal_with_gamma_zero_and_alpha_one_is_cross_entropy(batch) -> None:
    logits, targets = batch
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    focal = build_loss(TrainConfig(loss="focal", focal_alpha=1.0, focal_gamma=0.0))(a, targets)
    ce = F.cross_entropy(b, targets)
    focal.backward()
    ce.backward()
    torch.testing.assert_close(focal, ce)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (1.0, 0.5), (2.0, 5.0)])
def test_focal_matches_its_formula(batch, alpha: float, gamma: float) -> None:
    logits, targets = batch
    p_t = logits.double().softmax(1).gather(1, targets[:, None]).squeeze(1)
    expected = (-alpha * (1 - p_t) ** gamma * p_t.log()).mean()
    loss = FocalLoss(alpha, gamma)(logits, targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert loss < alpha * F.cross_entropy(logits, targets)  # easy samples are down-weighted


def test_square_loss_value_and_gradient(batch) -> None:
    logits, targets = batch
    logits.requires_grad_()
    one_hot = F.one_hot(targets, 10).float()
    loss = SquareLoss()(logits, targets)
    loss.backward()
    # Mean over the 10 classes of each sample, then over the batch.
    torch.testing.assert_close(loss, ((logits - one_hot) ** 2).sum(1).mean() / 10)
    torch.testing.assert_close(logits.grad, 2 * (logits.detach() - one_hot) / logits.numel())
    assert SquareLoss()(one_hot, targets) == 0


@pytest.mark.parametrize(
    "values",
    [
        {"loss": "cross_entropy"},
        {"loss": "label_smoothing", "label_smoothing": 0.1},
        {"loss": "focal", "focal_gamma": 2.0},
        {"loss": "focal", "focal_gamma": 0.5},  # the 0 < gamma < 1 case where x^gamma has an infinite slope at 0
        {"loss": "focal", "focal_gamma": 0.0},
        {"loss": "mse"},
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_give_finite_loss_and_gradient(values: dict, dtype: torch.dtype) -> None:
    # Rows 0-1 are confidently right, rows 2-3 confidently wrong.
    logits = torch.full((4, 10), -1e4)
    logits[[0, 1, 2, 3], [3, 7, 0, 0]] = 1e4
    targets = torch.tensor([3, 7, 5, 9])
    logits = logits.to(dtype).requires_grad_()
    loss = build_loss(TrainConfig(**values))(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_losses_run_in_float32_under_autocast(name: str) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 10)
    x, targets = torch.randn(32, 8), torch.randint(0, 10, (32,))
    loss_fn = build_loss(TrainConfig(loss=name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        loss = loss_fn(logits, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(loss, loss_fn(logits.detach().float(), targets))
