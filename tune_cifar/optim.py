"""Optimizers, the L1 penalty and the learning-rate schedule, built from a :class:`TrainConfig`.

Weight decay (and the L1 penalty) applies by default (``decay_scope: weights``) only to
parameters with more than one dimension: conv and linear weights. Biases and batch-norm
scales/shifts are left out, as in most CNN training recipes (Goyal et al. 2017; airbench): they
are few and add little capacity, so decaying them regularises little, while shrinking a BN scale
or shift towards zero constrains each channel's output scale and offset, which the network must
be free to set. ``decay_scope: all`` decays every parameter, as ``torch.optim.Adam(model.parameters(),
weight_decay=...)`` does in the second report's code.

Nothing here reads a tensor back to the host on the per-step path: the optimizers run on
``foreach``/``fused`` kernels, and :class:`LrSchedule` only touches Python floats per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau, StepLR

from tune_cifar.config import TrainConfig


class SignSGD(Optimizer):
    """Sign descent: ``p -= lr * sign(g)``, or Signum with momentum (Bernstein et al. 2018).

    With ``momentum > 0`` the sign is taken of ``m = momentum * m + (1 - momentum) * g``, the
    exponential moving average Signum uses, so the update size is ``lr`` per coordinate either
    way and ``lr`` means the same thing with and without momentum. Weight decay is added to the
    gradient before the average and the sign (coupled, like SGD's).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0.0 or not 0.0 <= momentum < 1.0 or weight_decay < 0.0:
            raise ValueError(f"SignSGD: bad lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                buffers = [self._momentum_buffer(p) for p in params]
                # lerp: m + (1 - beta) * (g - m) == beta * m + (1 - beta) * g
                torch._foreach_lerp_(buffers, grads, 1.0 - group["momentum"])
                grads = buffers
            torch._foreach_add_(params, torch._foreach_sign(grads), alpha=-group["lr"])
        return loss

    def _momentum_buffer(self, param: Tensor) -> Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]


def decayed_parameters(model: nn.Module, scope: str) -> list[nn.Parameter]:
    """The trainable parameters weight decay and the L1 penalty act on: those with ``ndim > 1``
    (conv and linear weights) for ``scope="weights"``, every one for ``scope="all"``."""
    if scope not in ("weights", "all"):
        raise ValueError(f"unknown decay scope {scope!r}")
    return [p for p in model.parameters() if p.requires_grad and (scope == "all" or p.ndim > 1)]


def build_optimizer(model: nn.Module, config: TrainConfig) -> Optimizer:
    """``config.optimizer`` over two groups: the decayed parameters (``config.decay_scope``) with
    ``config.weight_decay``, the rest (if any) with none.

    The decayed group is ``param_groups[0]``. Adam's weight decay is the coupled L2 term,
    AdamW's the decoupled one (Loshchilov & Hutter 2019). ``fused=True`` runs each update as
    one kernel over all tensors; PyTorch supports it for these three on CPU and CUDA. Build the
    optimizer after moving the model to its device.
    """
    decayed = decayed_parameters(model, config.decay_scope)
    decayed_ids = {id(p) for p in decayed}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in decayed_ids]
    groups = [
        group
        for group in ({"params": decayed, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0})
        if group["params"]
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=True)
    if config.optimizer == "sign_sgd":
        return SignSGD(groups, lr=config.lr, momentum=config.momentum)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


@torch.no_grad()
def apply_l1(params: list[Tensor], l1: float) -> None:
    """Add ``l1 * sign(w)`` to each gradient in place: the subgradient of ``l1 * sum |w|``.

    Call it after ``backward()`` and before gradient clipping and ``optimizer.step()``, with
    :func:`decayed_parameters`. Parameters without a gradient are skipped.
    """
    if l1 == 0.0:
        return
    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        torch._foreach_add_([p.grad for p in with_grad], torch._foreach_sign(with_grad), alpha=l1)


class LrSchedule:
    """Linear warm-up per step, then the epoch scheduler ``config.scheduler``.

    The training loop calls :meth:`step_batch` just before every ``optimizer.step()`` (it sets
    the lr of the step about to be taken, which :attr:`lr` then reports) and :meth:`step_epoch`
    after every epoch's validation. Optimizer step k = 1, 2, ..., ``config.warmup_epochs *
    steps_per_epoch`` uses ``lr * k / warmup_steps``; the epoch scheduler then starts from
    ``lr`` and counts only the epochs after warm-up:

    - ``step``: multiply by ``gamma`` every ``step_size`` epochs (StepLR);
    - ``plateau``: multiply by ``factor`` when the validation loss has not improved for more
      than ``patience`` epochs, never below ``min_lr`` (ReduceLROnPlateau, mode min);
    - ``cosine``: cosine from ``lr`` to ``min_lr`` over the ``epochs - warmup_epochs`` epochs
      after warm-up (CosineAnnealingLR), reaching ``min_lr`` at the last :meth:`step_epoch`;
    - ``none``: constant.

    ``steps_per_epoch`` must be the number of optimizer steps per epoch, so that warm-up ends
    with the epoch. Every group starts from ``config.lr`` (as :func:`build_optimizer` builds
    them), whatever lr a loaded optimizer state holds; :meth:`load_state_dict` then restores the
    position, so a resumed run continues the identical schedule.
    """

    def __init__(self, optimizer: Optimizer, config: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self._base_lr = config.lr
        self._warmup_epochs = config.warmup_epochs
        self._warmup_steps = config.warmup_epochs * steps_per_epoch
        self._steps = 0
        self._epochs = 0
        self._set_lr(config.lr)
        self._scheduler = _epoch_scheduler(optimizer, config)
        if self._warmup_steps:
            self._set_lr(self._base_lr / self._warmup_steps)

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (all groups share it)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step_batch(self) -> None:
        """Set the warm-up lr of the optimizer step about to be taken; a no-op after warm-up."""
        self._steps += 1
        if self._steps <= self._warmup_steps:
            self._set_lr(self._base_lr * self._steps / self._warmup_steps)

    def step_epoch(self, val_loss: float) -> None:
        """Advance the epoch scheduler; ``val_loss`` is only read by ``plateau``."""
        self._epochs += 1
        if self._scheduler is None or self._epochs <= self._warmup_epochs:
            return
        if isinstance(self._scheduler, ReduceLROnPlateau):
            self._scheduler.step(val_loss)
        else:
            self._scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "epochs": self._epochs,
            "lrs": [group["lr"] for group in self.optimizer.param_groups],
            "scheduler": None if self._scheduler is None else self._scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = state["steps"]
        self._epochs = state["epochs"]
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, state["lrs"], strict=True):
            group["lr"] = lr

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def _epoch_scheduler(optimizer: Optimizer, config: TrainConfig) -> LRScheduler | None:
    """The torch scheduler behind ``config.scheduler``; None when the lr stays constant.

    A plateau ``factor`` of 1 never changes the lr (and ReduceLROnPlateau rejects it), so it is
    constant too.
    """
    if config.scheduler == "step":
        return StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.scheduler == "plateau" and config.factor < 1.0:
        return ReduceLROnPlateau(
            optimizer, mode="min", patience=config.patience, factor=config.factor, min_lr=config.min_lr
        )
    if config.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=config.epochs - config.warmup_epochs, eta_min=config.min_lr)
    return None
