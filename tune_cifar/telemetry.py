"""What happens inside a network while it trains: per-layer gradient and weight-update flow.

The first source report plotted, per layer, the mean gradient magnitude and the size of each
epoch's weight update. This module measures both for every parameter tensor, every epoch,
without slowing training: each step adds three fused ``torch._foreach_norm`` calls into one
accumulator that stays on the training device, and nothing is copied to the host until the
epoch ends.

Per step, for each parameter tensor: mean |g| (= ‖g‖₁ / numel), max |g| (= ‖g‖∞) and ‖g‖₂,
averaged over the epoch's steps. Per epoch: ‖W_e − W_{e−1}‖₂, ‖W_e‖₂ and their ratio.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import thop
import torch
from torch import Tensor, nn

from tune_cifar.report import EXPLODING_GRAD_L2, HEALTH_ORDER, VANISHING_GRAD_L2

# THOP's count per architecture (the module tree's repr, which names every layer's shape) and input
# shape, kept for the life of the process: a Ray worker that runs several trials (actors are reused
# on one node) profiles each architecture once instead of once per trial (0.1-0.2 s each on a CPU).
_MACS: dict[tuple[str, tuple[int, ...]], int] = {}


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[int, int]:
    """THOP multiply-accumulates and parameter count for one image.

    Profiles a CPU copy, because THOP registers buffers on the modules it visits.
    """
    key = (repr(model), tuple(input_shape))
    if key not in _MACS:
        probe = copy.deepcopy(model).float().cpu().eval()
        macs, _ = thop.profile(probe, inputs=(torch.zeros(input_shape),), verbose=False)
        _MACS[key] = int(macs)
    return _MACS[key], int(sum(p.numel() for p in model.parameters()))


def _max_abs(grads: list[Tensor]) -> Tensor:
    """max |g| per tensor.

    On a GPU one fused ``_foreach_norm(inf)`` launch is cheapest; on the CPU that kernel is
    about 15x slower than ``aminmax`` (measured in ``benchmarks/train_throughput.py``: it alone
    cost 4% of a small-CNN step), so the CPU takes the min and max in one vectorised pass.
    """
    if grads[0].is_cuda:
        return torch.stack(torch._foreach_norm(grads, math.inf))
    extremes = [torch.aminmax(grad) for grad in grads]
    return torch.stack([torch.maximum(low.neg(), high) for low, high in extremes])


def layer_health(grad_l2: float, kind: str) -> str:
    """Flag a tensor's epoch-averaged gradient norm: any tensor can explode, only weights vanish.

    Vanishing is judged on ``weight`` tensors (conv kernels, linear matrices) alone: a conv bias
    followed by BatchNorm has an exactly zero gradient by construction (BN subtracts it out),
    which is not a training problem.
    """
    if not math.isfinite(grad_l2) or grad_l2 > EXPLODING_GRAD_L2:
        return "exploding"
    return "vanishing" if kind == "weight" and grad_l2 < VANISHING_GRAD_L2 else "ok"


def tensor_kinds(model: nn.Module) -> dict[str, str]:
    """``weight`` (a conv kernel or linear matrix), ``bias``, or ``norm`` (a BN scale or shift), by name."""
    kinds = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
            kind = "weight" if param.ndim > 1 else ("norm" if is_norm else "bias")
            kinds[f"{module_name}.{name}" if module_name else name] = kind
    return kinds


def worst_health(healths: list[str]) -> str:
    return max(healths, key=HEALTH_ORDER.index, default="ok")


class Telemetry:
    """Per-layer gradient statistics (per step, on device) and weight-update statistics (per epoch)."""

    def __init__(self, model: nn.Module) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        kinds = tensor_kinds(model)
        self.kinds = [kinds[name] for name in self.names]
        self._grad_sums = torch.zeros(3, len(self.params), device=device)  # rows: sum|g|, max|g|, ||g||
        self._steps = 0
        self._previous = self._snapshot()

    def _snapshot(self) -> list[Tensor]:
        return [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def record_step(self) -> None:
        """Add this step's gradient norms; call after backward, before clipping."""
        grads = [p.grad for p in self.params]
        l1 = torch.stack(torch._foreach_norm(grads, 1))
        l2 = torch.stack(torch._foreach_norm(grads, 2))
        self._grad_sums += torch.stack([l1, _max_abs(grads), l2]).float()
        self._steps += 1

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        """The ``layers`` rows for this epoch; resets the gradient accumulator and the weight snapshot."""
        current = self._snapshot()
        update = torch.stack(torch._foreach_norm(torch._foreach_sub(current, self._previous)))
        weight = torch.stack(torch._foreach_norm(current))
        grads = self._grad_sums / max(self._steps, 1)
        grads[0] /= torch.tensor(self.numels, dtype=grads.dtype, device=grads.device)
        table = torch.cat([grads, weight[None], update[None]]).cpu().tolist()  # the one host copy per epoch
        rows = []
        for i, name in enumerate(self.names):
            weight_l2, update_l2 = table[3][i], table[4][i]
            rows.append(
                {
                    "epoch": epoch,
                    "layer": name,
                    "layer_index": i,  # named_parameters order: the forward order of these models
                    "kind": self.kinds[i],
                    "numel": self.numels[i],
                    "grad_mean_abs": table[0][i],
                    "grad_max_abs": table[1][i],
                    "grad_l2": table[2][i],
                    "weight_l2": weight_l2,
                    "update_l2": update_l2,
                    "update_ratio": update_l2 / weight_l2 if weight_l2 > 0 else math.nan,
                    "health": layer_health(table[2][i], self.kinds[i]),
                }
            )
        self._grad_sums.zero_()
        self._steps = 0
        self._previous = current
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sums": self._grad_sums, "steps": self._steps, "previous": self._previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_sums.copy_(state["grad_sums"])
        self._steps = state["steps"]
        self._previous = [t.to(self._grad_sums.device) for t in state["previous"]]
