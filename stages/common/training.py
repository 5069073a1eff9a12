"""What every training stage shares: poly decay, seeding of loaders, and checkpointed epochs with resume.

A training stage reads like this::

    training = CheckpointedTraining(path, provenance, model, optimizer, arch, force=opts.force)
    for epoch in training.epochs(cfg.epochs):      # resumes after the last saved epoch
        loss = ...one epoch, calling check_finite(loss, ...) per step...
        training.end_epoch({"loss": loss, "f1": f1})   # checkpoint (rank 0), history
    training.finish()                                # cls.h5, complete

A killed run restarts from its last finished epoch with the optimizer, step counter and RNG states it had.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.artifacts import Provenance, _maybe_fault, load_checkpoint, save_checkpoint, save_model
from stages.common.distributed import barrier, is_main, unwrap
from stages.common.errors import WsssError


class TrainingDiverged(WsssError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """Polynomial decay ``base * (1 - step/total)^power`` (DeepLab; power 0.9 in every paper used here)."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, power: float = 0.9) -> None:
    """Apply poly decay to every parameter group from its own ``initial_lr`` (set when first called)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = poly_lr(group["initial_lr"], step, total_steps, power)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_finite(loss: torch.Tensor, path: Path, epoch: int, step: int) -> None:
    """Stop at the first NaN/Inf loss, saying what is kept and what to try."""
    if not torch.isfinite(loss.detach()).all():
        raise TrainingDiverged(
            f"{path}: the loss became {loss.item()} at epoch {epoch + 1}, step {step}; the last good "
            f"checkpoint (epoch {epoch}) is kept in {path.name}.partial; lower --lr and rerun to resume"
        )


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> None:
    """One optimisation step: clear gradients, backpropagate and step, through the AMP scaler if any."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch: a resumed run reshuffles exactly as the uninterrupted one."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + epoch)
    return generator


def worker_init(worker_id: int) -> None:
    """Seed NumPy and ``random`` in loader workers from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class CheckpointedTraining:
    """Resume-or-start, checkpoint after every epoch, and write the finished model artifact.

    The checkpoint (``NAME.h5.partial``) holds the weights, the optimizer (and AMP scaler) state, the
    epoch and step counters, the RNG states and the per-epoch history; it is replaced whole and
    atomically, so a kill at any moment leaves the previous epoch's checkpoint intact.
    """

    def __init__(
        self,
        path: Path,
        provenance: Provenance,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        arch: Mapping[str, Any],
        *,
        force: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.path = Path(path)
        self.provenance = provenance
        self.model = model
        self.optimizer = optimizer
        self.arch = dict(arch)
        self.scaler = scaler
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from = 0
        checkpoint = load_checkpoint(self.path, provenance, force=force)
        if checkpoint is not None and checkpoint.train_state is not None:
            state = checkpoint.train_state
            unwrap(model).load_state_dict(checkpoint.state_dict)
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            restore_rng_states(state["rng"])
            self.epoch = int(state["epoch"])
            self.step = int(state["step"])
            self.history = list(state.get("history") or [])
            self.resumed_from = self.epoch

    def epochs(self, total: int) -> Iterator[int]:
        """The epochs still to run, 0-based."""
        for epoch in range(self.epoch, total):
            self.epoch = epoch
            yield epoch

    def end_epoch(self, metrics: Mapping[str, Any]) -> None:
        """Record the epoch's figures and checkpoint (rank 0 writes, every rank waits)."""
        loss = metrics.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"{self.path}: the epoch loss became {loss} at epoch {self.epoch + 1}; the last good checkpoint "
                f"is kept in {self.path.name}.partial; lower --lr and rerun"
            )
        self.history.append({"epoch": self.epoch + 1, **{k: float(v) for k, v in metrics.items()}})
        if is_main():
            state: dict[str, Any] = {
                "epoch": self.epoch + 1,
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_states(),
                "history": self.history,
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            save_checkpoint(self.path, self.provenance, unwrap(self.model).state_dict(), self.arch, state)
            _maybe_fault("after-checkpoint")  # test fault injection (artifacts._maybe_fault)
        barrier()

    def finish(self, meta: Mapping[str, Any] | None = None) -> Path:
        """Write the complete model artifact (rank 0) with the training history among its records."""
        if is_main():
            save_model(
                self.path,
                self.provenance,
                unwrap(self.model).state_dict(),
                self.arch,
                meta={"history": self.history, **(meta or {})},
            )
        barrier()
        return self.path
