"""Train one configuration: the loop shared by a single run (``tune_cifar.train``) and a study trial.

A :class:`Trainer` owns everything that changes while a network trains (model, optimizer,
schedule, telemetry, data order, SWA average) and can hand all of it over as one
``state_dict``, so a trial restored from a checkpoint continues exactly where it stopped.

The hot loop keeps statistics on the training device: loss and accuracy sums, gradient
norms and (when probing) per-step losses are tensors, copied to the host once per epoch.
Validation loss is always cross-entropy, whatever the training loss, so that it can be
compared across trials; the training loss column is the objective actually minimised.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from tune_cifar.calibration import Choice
from tune_cifar.calibration import choose as choose_precision
from tune_cifar.config import TrainConfig
from tune_cifar.data import DeviceLoader, Splits
from tune_cifar.losses import build_loss
from tune_cifar.models import build_model
from tune_cifar.optim import LrSchedule, apply_l1, build_optimizer, decayed_parameters
from tune_cifar.outcome import diverged
from tune_cifar.precision import autocast
from tune_cifar.report import EpochReport
from tune_cifar.telemetry import Telemetry, count_macs, worst_health

EVAL_BATCH_SIZE = 1000
PROBE_STEP_SIZES = (0.5, 1.0, 2.0, 4.0)  # multiples of the current lr, as Santurkar et al. (2018)


class Trainer:
    """Trains ``config`` on ``splits`` one epoch at a time."""

    def __init__(self, config: TrainConfig, splits: Splits, device: str | torch.device = "cpu", compile: bool = False):
        self.config = config
        self.splits = splits
        self.device = torch.device(device)
        # auto measured (or cached) before seeding: the calibration's random draws never reach the trial
        self.computing: Choice = choose_precision(config, self.device)
        self.precision = self.computing.precision  # fp32 or bf16, never auto
        self.autocast = autocast(self.device, self.precision)
        torch.manual_seed(config.seed)
        self.model = build_model(config)
        self.macs, self.params = count_macs(self.model)
        layout = torch.channels_last if self.computing.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=layout)
        # what the steps call: the model itself, or its torch.compile wrapper (same parameters)
        self.network = torch.compile(self.model) if compile else self.model
        self.loss_fn = build_loss(config)
        self.optimizer = build_optimizer(self.model, config)
        self.train_loader = DeviceLoader(
            splits.train_x,
            splits.train_y,
            config.batch_size,
            self.device,
            train=True,
            augment=config.augment,
            seed=config.seed,
        )
        self.schedule = LrSchedule(self.optimizer, config, steps_per_epoch=len(self.train_loader))
        self.telemetry = Telemetry(self.model)
        self.decayed = decayed_parameters(self.model, config.decay_scope)  # what L1 and weight decay act on
        self.swa_model = AveragedModel(self.model) if config.swa_epochs else None
        # Built once: the validation split stays on the device for every epoch's evaluation.
        # None when retraining on train + validation.
        self.val_loader = self._eval_loader(splits.val_x, splits.val_y) if len(splits.val_y) else None
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.layer_health: list[str] = []
        self.final_val: dict[str, float] | None = None
        self.diverged = False  # the last epoch's training loss was NaN or infinite: train no further

    # -- one step ----------------------------------------------------------------------------
    def forward_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits under the precision's autocast, and the training loss (computed in float32)."""
        with self.autocast:
            logits = self.network(images)
        return self.loss_fn(logits, labels), logits

    def train_step(self, images: Tensor, labels: Tensor, probe: bool = False) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """One optimizer step: forward, backward, telemetry, the probe when asked, L1, clipping, lr, step.

        Returns the (undetached) loss, the logits and the probe's row (empty without a probe).
        Telemetry sees the raw gradient, before L1 and clipping change it.
        """
        self.step += 1
        loss, logits = self.forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.telemetry.record_step()
        self.schedule.step_batch()  # sets this step's lr: the probe walks with it too
        probed = self._probe(images, labels, loss.detach()) if probe else {}
        if self.config.l1:
            apply_l1(self.decayed, self.config.l1)
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=True)
        self.optimizer.step()
        return loss, logits, probed

    # -- one epoch -------------------------------------------------------------------------
    def train_epoch(self, on_step: Callable[[int, int], None] | None = None) -> EpochReport:
        """Train one epoch, validate, step the schedule; returns the epoch's table rows.

        Sums stay on the device and reach the host once, at the end of the epoch. ``on_step``
        (a progress display) hears ``(steps done, steps in the epoch)`` after every step.
        """
        config = self.config
        self.epoch += 1
        self.model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        probing = config.probe_every > 0
        step_losses = torch.zeros(len(self.train_loader), device=self.device) if probing else None
        step_rows: list[dict[str, Any]] = []
        lr_first: float | None = None
        for i, (images, labels) in enumerate(self.train_loader):
            probe = probing and (self.step + 1) % config.probe_every == 0
            loss, logits, probed = self.train_step(images, labels, probe)
            lr_first = self.schedule.lr if lr_first is None else lr_first
            loss_sum += loss.detach() * labels.size(0)
            correct += (logits.argmax(1) == labels).sum()
            if step_losses is not None:
                step_losses[i] = loss.detach()
                step_rows.append({"step": self.step, "epoch": self.epoch, "lr": self.schedule.lr, **probed})
            if on_step is not None:
                on_step(i + 1, len(self.train_loader))
        lr_last = self.schedule.lr  # before step_epoch sets the next epoch's
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - started
        images = min(len(self.train_loader) * config.batch_size, self.train_loader.num_images)
        if step_losses is not None:
            for row, value in zip(step_rows, step_losses.tolist(), strict=True):
                row["train_loss"] = value
        if self.swa_model is not None and self.epoch > config.epochs - config.swa_epochs:
            self.swa_model.update_parameters(self.model)
        train_loss = loss_sum.item() / images
        self.diverged = diverged(train_loss)
        val_loss, val_acc = self.evaluate(self.val_loader) if self.val_loader is not None else (None, None)
        self.schedule.step_epoch(val_loss if val_loss is not None else train_loss)
        epoch_row = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "train_acc": correct.item() / images,
            "val_loss": val_loss,
            "val_acc": val_acc,
            # the rates this epoch trained with (they differ under warm-up), not the next epoch's
            "lr": lr_first,
            "lr_last": lr_last,
            "seconds": time.perf_counter() - started,
            "images_per_s": images / train_seconds,
        }
        self.history.append(epoch_row)
        layers = self.telemetry.end_epoch(self.epoch)
        self.layer_health.append(worst_health([row["health"] for row in layers]))
        return EpochReport(epoch_row, layers, step_rows)

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: DeviceLoader, model: nn.Module | None = None) -> tuple[float, float]:
        """Cross-entropy and accuracy on a split, unaugmented, in large batches."""
        model = model if model is not None else self.network
        was_training = self.model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for batch, targets in loader:
            with self.autocast:
                logits = model(batch)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
            correct += (logits.argmax(1) == targets).sum()
        self.model.train(was_training)
        return loss_sum.item() / loader.num_images, correct.item() / loader.num_images

    def _eval_loader(self, images: Any, labels: Any) -> DeviceLoader:
        return DeviceLoader(images, labels, EVAL_BATCH_SIZE, self.device, train=False, augment=False, seed=0)

    def finish(self) -> dict[str, Any]:
        """After the last epoch: fold in the SWA average (with fresh BN statistics) and validate it."""
        if self.swa_model is not None and self.final_val is None:
            update_bn(self.train_loader, self.swa_model, device=self.device)
            self.final_val = {"val_loss": None, "val_acc": None}
            if self.val_loader is not None:
                loss, acc = self.evaluate(self.val_loader, model=self.swa_model)
                self.final_val = {"val_loss": loss, "val_acc": acc}
        return self.summary()

    def evaluate_test(self) -> dict[str, float]:
        """The test set, once, with the final model (the SWA average when there is one)."""
        model = self.swa_model if self.swa_model is not None and self.final_val is not None else None
        test_loader = self._eval_loader(self.splits.test_x, self.splits.test_y)
        loss, acc = self.evaluate(test_loader, model=model)
        return {"test_loss": loss, "test_acc": acc}

    def final_model(self) -> nn.Module:
        return self.swa_model.module if self.swa_model is not None and self.final_val is not None else self.model

    def summary(self) -> dict[str, Any]:
        """The ``trials`` row fields this trainer knows (the caller adds ids, status and timing)."""
        validated = [row for row in self.history if row["val_acc"] is not None]
        best = max(validated, key=lambda row: row["val_acc"], default=None)
        final = self.final_val["val_acc"] if self.final_val else (self.history[-1]["val_acc"] if self.history else None)
        return {
            "epochs_run": self.epoch,
            "best_val_acc": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_val_acc": final,
            "macs": self.macs,
            "params": self.params,
            "grad_health": worst_health(self.layer_health),
            "data": self.splits.source,
            "train_images": len(self.splits.train_y),
            "val_images": len(self.splits.val_y),
            "node": platform.node(),
            "device": str(self.device),
            "precision": self.precision,  # resolved: what auto meant here
            "channels_last": self.computing.channels_last,
            "precision_rates": self.computing.rates_text() or None,  # what auto measured (null: explicit)
        }

    # -- loss-landscape probe (BN study) -----------------------------------------------------
    def _probe(self, images: Tensor, labels: Tensor, loss: Tensor) -> dict[str, float]:
        """Walk along the current gradient at several step sizes (Santurkar et al., 2018).

        Records the range of the loss over x − s·g, the largest change of the gradient
        (gradient predictiveness) and that change over the distance moved (effective
        β-smoothness). Parameters, gradients and BN running statistics are restored after.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        origin = [p.detach().clone() for p in params]
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        losses, changes, betas = [loss.float()], [], []
        for multiple in PROBE_STEP_SIZES:
            size = multiple * self.schedule.lr
            with torch.no_grad():
                for p, p0, g in zip(params, origin, grads, strict=True):
                    p.copy_(p0 - size * g)
            self.model.zero_grad(set_to_none=True)
            with self.autocast:
                probe_loss = self.loss_fn(self.model(images), labels)
            probe_loss.backward()
            diff = torch.stack(torch._foreach_norm(torch._foreach_sub([p.grad for p in params], grads)))
            change = torch.linalg.vector_norm(diff)
            losses.append(probe_loss.detach().float())
            changes.append(change)
            betas.append(change / (size * grad_norm).clamp_min(1e-12))
        with torch.no_grad():
            for p, p0, g in zip(params, origin, grads, strict=True):
                p.copy_(p0)
                p.grad = g
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        stats = torch.stack([torch.stack(losses).min(), torch.stack(losses).max(), max(changes), max(betas)]).tolist()
        return dict(zip(("probe_loss_min", "probe_loss_max", "probe_grad_change", "probe_beta"), stats, strict=True))

    # -- checkpoints -------------------------------------------------------------------------
    def _compute_as(self, choice: Choice) -> None:
        """Train in ``choice``'s precision and memory layout from now on."""
        self.computing = choice
        self.precision = choice.precision
        self.autocast = autocast(self.device, self.precision)
        layout = torch.channels_last if choice.channels_last else torch.contiguous_format
        for module in (self.model, self.swa_model):
            if module is not None:
                module.to(memory_format=layout)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: weights, optimizer, schedule, telemetry, RNG."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "telemetry": self.telemetry.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "swa_model": self.swa_model.state_dict() if self.swa_model is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "layer_health": self.layer_health,
            "computing": dataclasses.asdict(self.computing),  # a restored trial keeps its precision and layout
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "computing" in state:  # whatever this node would choose: one trial, one arithmetic
            self._compute_as(Choice(**state["computing"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.telemetry.load_state_dict(state["telemetry"])
        self.train_loader.load_state_dict(state["train_loader"])
        if self.swa_model is not None:
            self.swa_model.load_state_dict(state["swa_model"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.layer_health = list(state["history"]), list(state["layer_health"])
        self.diverged = bool(self.history) and diverged(self.history[-1]["train_loss"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
