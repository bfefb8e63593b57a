"""Classification losses, called as ``loss(logits, targets)`` and returning the batch mean.

Each loss casts the logits to float32 first: under ``torch.autocast(bfloat16)`` the network
emits bf16 logits, and a log-softmax or a squared error in bf16 (8 bits of mantissa) would
round small per-sample losses and their gradients away. The cast is part of the autograd
graph, so gradients flow back into the bf16 network unchanged in dtype.

None of them synchronises with the host (no ``.item()``, no data-dependent shapes), so they
run inside a compiled training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_cifar.config import TrainConfig


class CrossEntropy(nn.Module):
    """Softmax cross-entropy, with optional label smoothing (Szegedy et al. 2016)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): ``-alpha * (1 - p_t)^gamma * log p_t``.

    ``log p_t`` comes from ``log_softmax`` rather than ``log(softmax)``, so a confidently wrong
    sample gives a large finite loss instead of ``log(0)``. ``1 - p_t`` is ``-expm1(log p_t)``,
    exact when ``p_t`` is close to 1 where ``1 - exp(.)`` would cancel. It is floored at the
    smallest normal float before the power: for ``0 < gamma < 1`` the derivative of ``x^gamma``
    is infinite at ``x = 0`` and would turn a perfectly classified sample's zero gradient into
    NaN. With ``gamma = 0`` and ``alpha = 1`` this is exactly cross-entropy.
    """

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
        one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(torch.float32).tiny)
        return (-self.alpha * one_minus_pt.pow(self.gamma) * log_pt).mean()


class SquareLoss(nn.Module):
    """Squared error between the raw logits and the one-hot target (Hui & Belkin 2021).

    The logits, not the softmax, are regressed onto the one-hot vector: squared error through a
    softmax has a vanishing gradient when the softmax saturates on a wrong class (the softmax
    Jacobian goes to zero), while on logits the gradient ``2 (z - y)`` stays proportional to the
    error, which is what makes the square loss competitive with cross-entropy in their study.

    Reduction follows theirs (PyTorch's ``mse_loss`` default): the mean over the 10 classes of
    each sample, then over the batch. For 10 classes they use no rescaling (k = M = 1). The
    gradient per logit is therefore ``2 (z - y) / (N * C)``, about a fifth of cross-entropy's
    ``(p - y) / N``; the learning rate is searched per loss, so the constant is absorbed there.

    The target is built with ``scatter_`` rather than ``F.one_hot``, which checks the label
    range with a host synchronisation on CPU.
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        one_hot = torch.zeros_like(logits).scatter_(1, targets.unsqueeze(1), 1.0)
        return F.mse_loss(logits, one_hot)


def build_loss(config: TrainConfig) -> nn.Module:
    """The loss ``config.loss`` names, with its own keys (label_smoothing, focal_alpha/gamma)."""
    if config.loss == "cross_entropy":
        return CrossEntropy()
    if config.loss == "label_smoothing":
        return CrossEntropy(label_smoothing=config.label_smoothing)
    if config.loss == "focal":
        return FocalLoss(alpha=config.focal_alpha, gamma=config.focal_gamma)
    if config.loss == "mse":
        return SquareLoss()
    raise ValueError(f"unknown loss {config.loss!r}")
