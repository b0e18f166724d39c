"""One flat training loop for every trained architecture (nanoGPT's loop, Atlas's schedule hooks).

An architecture describes *what* is trained as a `TrainingTask` (its trainable modules, how to
get micro-batch `i` of step `s`, the loss of a micro-batch, a dev evaluation, extra state and a
hook after each optimizer step, e.g. an index refresh); `train` does the rest, identically for
all of them:

- AdamW over the task's parameter groups (an architecture may give each group its own learning
  rate: Atlas's reader and retriever), a linear warm-up then linear/cosine decay, gradient
  accumulation over `grad_accum` micro-batches and clipping to `clip_norm`;
- seeded: the task derives its batches from (step, micro) alone, and dropout draws from torch's
  RNG, whose state is checkpointed, so a resumed run takes exactly the steps an uninterrupted one
  takes and ends with the same weights;
- dev evaluation every `eval_every` steps (and at the end) with early stopping after `patience`
  evaluations without improvement of `dev/loss`; the best weights are restored at the end;
- a resumable checkpoint every `checkpoint_every` steps (and when the wall-clock guard stops
  training): trainable parameters, optimizer, scheduler, step, RNG states, history, best state
  and the task's own state, written atomically, refused if made with other settings;
- `report(step, metrics)` after every step (train/loss, train/lr, the task's metrics) and every
  evaluation (dev/...): the stage layer logs these as MLflow metric history and plots them.

The loop charges `optimizer_steps` to the meter; the task charges what its forward/backward
passes cost (tokens, FLOPs, encoder passes, refreshes), since only it knows its models.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ragops.training.checkpoint import load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    import torch

    from ragops.config import OptimizerOptions
    from ragops.cost import CostMeter

Report = Callable[[int, dict[str, float]], None]


class TrainingTask(Protocol):
    """What an architecture hands the loop. A task may subclass this to inherit the no-op defaults
    of `evaluate`, `after_step`, `state_dict` and `load_state_dict`."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose trainable (requires_grad) parameters are optimised and checkpointed."""

    def param_groups(self) -> list[dict[str, Any]] | None:
        """AdamW parameter groups (each may carry its own "lr"); None: one group of all trainable parameters."""

    def micro_batch(self, step: int, micro: int) -> Any:
        """Micro-batch `micro` of optimizer step `step`: a pure function of (step, micro) and the seed."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of a micro-batch (to be back-propagated) and metrics to report."""

    def evaluate(self) -> dict[str, float]:
        """Dev metrics (`dev/loss` is the one early stopping watches; lower is better)."""
        return {}

    def after_step(self, step: int) -> dict[str, float]:  # noqa: ARG002
        """Called after optimizer step `step` (1-based count of steps done): refreshes, swaps."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state a resumed run needs (index version, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: ARG002
        return None


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    truncated: bool  # stopped by the wall-clock guard before `steps` were done
    stopped_early: bool  # early stopping
    best: dict[str, float] | None  # the best dev evaluation (the weights restored)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        last = next((m for _, m in reversed(self.history) if "train/loss" in m), {})
        return {
            "steps": self.steps, "resumed_from": self.resumed_from, "truncated": self.truncated,
            "stopped_early": self.stopped_early, "best": self.best, "final_train_loss": last.get("train/loss"),
        }


@dataclass
class TrainRun:
    """What the train stage hands an architecture's `train`: where to checkpoint, what to charge,
    where to report loss curves, and the limits. `train(task, options)` runs the shared loop with them."""

    meter: CostMeter | None = None
    checkpoint: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    report: Report | None = None
    max_minutes: float | None = None
    progress: bool = True
    device: str = "cpu"

    def train(self, task: TrainingTask, options: OptimizerOptions, *, seed: int, desc: str = "training") -> TrainResult:
        return train(task, options, seed=seed, checkpoint=self.checkpoint, settings=self.settings, meter=self.meter,
                     report=self.report, max_minutes=self.max_minutes, progress=self.progress, desc=desc)


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up over
    ceil(warmup·total) steps from 1/(warm-up steps), then constant, linear or cosine decay to 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = (step - warm + 1) / max(1, total - warm)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the trainable parameters only (frozen base weights are reconstructible)."""
    return {
        name: {key: p.detach().to("cpu", copy=True) for key, p in module.named_parameters() if p.requires_grad}
        for name, module in modules.items()
    }


def load_trainable_state(modules: dict[str, torch.nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    import torch

    for name, module in modules.items():
        saved = state.get(name, {})
        params = dict(module.named_parameters())
        missing = [k for k, p in params.items() if p.requires_grad and k not in saved]
        if missing:
            raise RuntimeError(f"checkpoint lacks trainable parameters of '{name}': {missing[:3]}")
        with torch.no_grad():
            for key, tensor in saved.items():
                params[key].copy_(tensor.to(params[key].device))


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _params(task: TrainingTask) -> list[dict[str, Any]]:
    groups = task.param_groups()
    if groups is None:
        params = [p for module in task.modules().values() for p in module.parameters() if p.requires_grad]
        groups = [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    if not any(g["params"] for g in groups):
        raise RuntimeError("training task has no trainable parameters")
    return groups


def train(
    task: TrainingTask,
    options: OptimizerOptions,
    *,
    seed: int,
    checkpoint: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    meter: CostMeter | None = None,
    report: Report | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Run `options.steps` optimizer steps of `task`, resuming from `checkpoint` when it exists.

    `settings` are stored in the checkpoint and must match on resume (else RagopsError, one line).
    """
    import torch

    started = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    modules = task.modules()
    for module in modules.values():
        module.train()
    groups = _params(task)
    base_lrs = [float(g.get("lr", options.lr)) for g in groups]
    optimizer = torch.optim.AdamW(
        [{**g, "lr": lr} for g, lr in zip(groups, base_lrs, strict=True)], lr=options.lr, weight_decay=options.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, options.steps, options.warmup, options.schedule)
    )
    settings = settings or {}
    history: list[tuple[int, dict[str, float]]] = []
    best: dict[str, float] | None = None
    best_state = None
    bad_evaluations = 0
    start_step = 0
    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, settings)
        load_trainable_state(modules, state["modules"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.load_state_dict(state["task"])
        history = [(int(s), dict(m)) for s, m in state["history"]]
        best, best_state, bad_evaluations = state["best"], state["best_state"], int(state["bad_evaluations"])
        start_step = int(state["step"])
        _set_rng_state(state["rng"])
        if meter is not None and state.get("meter"):
            meter.restore(state["meter"])  # the interrupted attempt's cost is part of this training's cost

    def emit(step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        history.append((step, clean))
        if report is not None:
            report(step, clean)

    def write_checkpoint(step: int) -> None:
        if checkpoint is None:
            return
        save_checkpoint(checkpoint, {
            "step": step, "modules": trainable_state(modules), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "task": task.state_dict(), "history": history,
            "best": best, "best_state": best_state, "bad_evaluations": bad_evaluations, "rng": _rng_state(),
            "meter": None if meter is None else meter.snapshot(),
        }, settings)

    def evaluate(step: int) -> bool:
        """Evaluate, track the best weights; True when early stopping says stop."""
        nonlocal best, best_state, bad_evaluations
        for module in modules.values():
            module.eval()
        with torch.no_grad():
            metrics = task.evaluate()
        for module in modules.values():
            module.train()
        emit(step, metrics)
        watched = metrics.get("dev/loss")
        if watched is None:
            return False
        if best is None or watched < best["dev/loss"]:
            best, best_state, bad_evaluations = {**metrics, "step": float(step)}, trainable_state(modules), 0
            return False
        bad_evaluations += 1
        return options.patience is not None and bad_evaluations >= options.patience

    truncated = stopped_early = False
    step = start_step
    bar = _bar(progress, options.steps, start_step, desc)
    try:
        while step < options.steps:
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(options.grad_accum):
                loss, metrics = task.loss(task.micro_batch(step, micro))
                (loss / options.grad_accum).backward()
                loss_sum += float(loss.detach()) / options.grad_accum
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / options.grad_accum
            grad_norm = None
            if options.clip_norm is not None:
                params = [p for g in groups for p in g["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, options.clip_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            if meter is not None:
                meter.add(optimizer_steps=1)
            extra = task.after_step(step) or {}
            emit(step, {"train/loss": loss_sum, "train/lr": optimizer.param_groups[0]["lr"],
                        **({"train/grad_norm": grad_norm} if grad_norm is not None else {}), **totals, **extra})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                bar.update(1)
            if options.eval_every and step % options.eval_every == 0 and step < options.steps and evaluate(step):
                stopped_early = True
                break
            out_of_time = max_minutes is not None and (time.perf_counter() - started) / 60 > max_minutes
            if out_of_time and step < options.steps:
                truncated = True
                write_checkpoint(step)
                break
            if step % options.checkpoint_every == 0 and step < options.steps:
                write_checkpoint(step)
        if not truncated and not stopped_early:
            evaluate(step)
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None and not truncated:
        load_trainable_state(modules, best_state)  # the best dev weights, as early stopping promises
    for module in modules.values():
        module.eval()
    return TrainResult(
        steps=step, resumed_from=start_step, truncated=truncated, stopped_early=stopped_early, best=best,
        history=history, seconds=time.perf_counter() - started,
    )


def _bar(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step")


def cycle_batches(n_items: int, batch_size: int, seed: int) -> Callable[[int], list[int]]:
    """index -> item indices of batch `index` (0-based) over epochs of a seeded permutation: a pure
    function of (index, seed), so resumed and uninterrupted runs see the same batches."""
    if n_items <= 0:
        raise ValueError("cycle_batches: no items")
    per_epoch = max(1, math.ceil(n_items / batch_size))
    orders: dict[int, np.ndarray] = {}

    def batch(index: int) -> list[int]:
        epoch, position = divmod(index, per_epoch)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n_items)
        return [int(i) for i in orders[epoch][position * batch_size : (position + 1) * batch_size]]

    return batch


def iterate_in_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
