"""The shared training substrate: loop, checkpoints, index refresh, training data, black-box view.

Loop behaviour is checked against straightforward reference computations (a hand-written AdamW-free
SGD equivalence is not needed: we compare against torch's own optimizer driven step by step in the
test, without the loop), and resumption against an uninterrupted run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ragops.config import OptimizerOptions
from ragops.errors import RagopsError
from ragops.training.checkpoint import load_checkpoint, save_checkpoint
from ragops.training.loop import cycle_batches, lr_factor, train


class Regression:
    """A TrainingTask: a linear model fit to y = 3x − 1 with dropout, deterministic batches."""

    def __init__(self, seed: int = 0, fail_at: int | None = None, batch_size: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 1, generator=g)
        self.y = 3 * self.x - 1
        torch.manual_seed(123)
        self.model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.batches = cycle_batches(32, batch_size, seed)
        self.fail_at = fail_at
        self.extra = 0

    def modules(self):
        return {"model": self.model}

    def param_groups(self):
        return None

    def micro_batch(self, step, micro):
        return self.batches(step * 2 + micro)

    def loss(self, rows):
        pred = self.model(self.x[rows])
        loss = torch.nn.functional.mse_loss(pred, self.y[rows])
        return loss, {"train/mse": float(loss.detach())}

    def evaluate(self):
        with torch.no_grad():
            return {"dev/loss": float(torch.nn.functional.mse_loss(self.model(self.x), self.y))}

    def after_step(self, step):
        self.extra += 1
        if self.fail_at is not None and step == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return {}

    def state_dict(self):
        return {"extra": self.extra}

    def load_state_dict(self, state):
        self.extra = state["extra"]


def options(**kw) -> OptimizerOptions:
    base = {"steps": 8, "batch_size": 4, "grad_accum": 2, "lr": 0.05, "warmup": 0.25, "checkpoint_every": 2, "clip_norm": 1.0}
    return OptimizerOptions(**{**base, **kw})


def weights(task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.model.parameters()]


def test_lr_schedule_by_hand():
    # 10 steps, 20 % warm-up = 2 steps: 1/2, 2/2, then linear decay over the remaining 8.
    assert [round(lr_factor(s, 10, 0.2, "linear"), 4) for s in range(10)] == [0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert lr_factor(5, 10, 0.2, "constant") == 1.0
    assert lr_factor(9, 10, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi)))
    assert lr_factor(2, 10, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 1 / 8)))


def test_cycle_batches_cover_each_epoch_once_and_are_a_pure_function():
    batch = cycle_batches(10, 3, seed=5)
    epoch = sorted(i for b in range(4) for i in batch(b))
    assert epoch == list(range(10))  # 4 batches = one epoch of 10 items (3+3+3+1)
    assert cycle_batches(10, 3, seed=5)(6) == batch(6)  # the same for a fresh instance (a resumed run)
    assert sorted(i for b in range(4, 8) for i in batch(b)) == list(range(10))


def test_loop_matches_a_plain_torch_reference_loop():
    """The loop's steps equal an explicit AdamW + LambdaLR + clipping + accumulation loop."""
    opt = options(steps=5, checkpoint_every=100)
    task = Regression()
    result = train(task, opt, seed=7, progress=False)
    reference = Regression()
    torch.manual_seed(7)
    optimizer = torch.optim.AdamW(reference.model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opt.steps, opt.warmup, opt.schedule))
    reference.model.train()
    for step in range(opt.steps):
        optimizer.zero_grad()
        for micro in range(opt.grad_accum):
            loss, _ = reference.loss(reference.micro_batch(step, micro))
            (loss / opt.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(reference.model.parameters(), opt.clip_norm)
        optimizer.step()
        schedule.step()
    for a, b in zip(weights(task), weights(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert result.steps == 5 and not result.truncated
    assert [s for s, m in result.history if "train/loss" in m] == [1, 2, 3, 4, 5]
    assert result.history[-1][1].keys() == {"dev/loss"}


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    settings = {"lr": 0.05, "data": "abc"}
    straight = Regression()
    train(straight, options(), seed=3, checkpoint=tmp_path / "a.ckpt", settings=settings, progress=False)

    broken = Regression(fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(broken, options(), seed=3, checkpoint=tmp_path / "b.ckpt", settings=settings, progress=False)
    state = load_checkpoint(tmp_path / "b.ckpt", settings)
    assert state["step"] == 4 and state["task"] == {"extra": 4}  # the last checkpoint before the kill
    resumed = Regression()
    result = train(resumed, options(), seed=3, checkpoint=tmp_path / "b.ckpt", settings=settings, progress=False)
    assert result.resumed_from == 4 and result.steps == 8 and resumed.extra == 8
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout RNG and data order restored exactly


def test_checkpoint_with_other_settings_is_refused_naming_the_setting(tmp_path):
    save_checkpoint(tmp_path / "c.ckpt", {"step": 1}, {"options": {"lr": 1e-4, "steps": 5}, "seed": 1})
    with pytest.raises(RagopsError) as error:
        load_checkpoint(tmp_path / "c.ckpt", {"options": {"lr": 2e-5, "steps": 5}, "seed": 1})
    message = str(error.value)
    assert "options.lr: 0.0001 (checkpoint) vs 2e-05 (now)" in message and "steps" not in message and "\n" not in message
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RagopsError, match="not a readable ragops checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt", {})


def test_early_stopping_restores_the_best_dev_weights():
    class Worsening(Regression):
        """Dev loss improves at the first evaluation, then gets worse: early stop after `patience`."""

        calls = 0

        def evaluate(self):
            Worsening.calls += 1
            if Worsening.calls == 1:
                self.best_copy = [p.detach().clone() for p in self.model.parameters()]
            return {"dev/loss": float(Worsening.calls)}

    task = Worsening()
    result = train(task, options(steps=20, eval_every=2, patience=2, checkpoint_every=100), seed=0, progress=False)
    assert result.stopped_early and result.steps == 6 and result.best["step"] == 2.0
    for a, b in zip(weights(task), task.best_copy, strict=True):
        torch.testing.assert_close(a, b)


def test_wall_clock_guard_stops_checkpoints_and_marks_truncated(tmp_path):
    task = Regression()
    result = train(task, options(steps=50), seed=0, checkpoint=tmp_path / "g.ckpt", max_minutes=1e-9, progress=False)
    assert result.truncated and result.steps == 1
    assert load_checkpoint(tmp_path / "g.ckpt", {})["step"] == 1


def test_meter_counts_optimizer_steps_and_resumed_cost(tmp_path):
    from ragops.cost import CostMeter

    with CostMeter("train") as first, pytest.raises(KeyboardInterrupt):
        first.add(examples=7)
        train(Regression(fail_at=3), options(checkpoint_every=2), seed=0, checkpoint=tmp_path / "m.ckpt", meter=first, progress=False)
    stored = load_checkpoint(tmp_path / "m.ckpt", {})["meter"]
    assert stored["counters"]["optimizer_steps"] == 2 and stored["wall_s"] > 0
    with CostMeter("train") as second:
        train(Regression(), options(checkpoint_every=2), seed=0, checkpoint=tmp_path / "m.ckpt", meter=second, progress=False)
    # 8 steps in all: 2 counted at the checkpoint of the first attempt + 6 in the second; the
    # examples charged before the checkpoint are carried over too, and so are its seconds.
    assert second.counters["optimizer_steps"] == 8
    assert second.counters["examples"] == 7
    assert second.wall_s > stored["wall_s"]
