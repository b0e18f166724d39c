"""Compute accounting, logged under the same keys by every stage and architecture.

`CostMeter` measures wall and CPU seconds, peak resident memory, GPU seconds and peak GPU memory
(when CUDA is used), and counts what a RAG system spends: LM tokens (prompt, retrieved,
generated), estimated FLOPs, retrieval calls and index refreshes. Training and inference are
metered separately (`phase`), so an architecture's one-off training cost is never mixed into its
per-question inference cost; within a phase, `part(...)` meters each task on its own (the QA
tasks per 1,000 questions, language modelling per 1,000 tokens), so one task's time is never
divided by another task's count.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import psutil

Phase = Literal["train", "inference", "stage"]

# Counter names every architecture reports (0 when it does not apply), so MLflow's compare view
# lines them up without manual key selection.
COUNTERS = (
    "tokens_prompt",
    "tokens_retrieved",
    "tokens_generated",
    "tokens_scored",
    "flops",
    "retrieval_calls",
    "index_refreshes",
    "examples",
    "questions",
    # training (0 at inference and for methods that train nothing)
    "tokens_trained",  # LM tokens through a forward+backward pass
    "optimizer_steps",
    "encoder_passes",  # texts through the retrieval encoder (training, refreshes, re-indexing)
    "encoder_flops",  # the encoder's share of `flops`
    "index_refresh_s",  # wall seconds spent re-embedding and re-indexing (also when in the background)
)


def forward_flops(n_params: int, n_tokens: int, n_layers: int = 0, d_model: int = 0, context: int = 0) -> float:
    """Forward FLOPs of `n_tokens` tokens that each attend to `context` positions.

    2 per (non-embedding) parameter per token for the matrix multiplies, plus, per layer, the
    attention scores Q·Kᵀ (2·context·d_model per token) and the attention-weighted sum of the
    values (another 2·context·d_model per token): Hoffmann et al. 2022 (Chinchilla), App. F,
    "key @ query logits" and "softmax @ query reductions", d_attn = heads × head size = d_model.
    The softmax itself (~3·heads·context) is left out, as in Kaplan et al. 2020, Table 1.
    """
    return 2.0 * n_params * n_tokens + 4.0 * n_layers * context * d_model * n_tokens


def training_flops(n_params: int, n_tokens: int, n_layers: int = 0, d_model: int = 0, context: int = 0) -> float:
    """Training FLOPs: forward plus backward, about 3x the forward (the usual 6·N·D)."""
    return 3.0 * forward_flops(n_params, n_tokens, n_layers, d_model, context)


class _PeakRSS:
    """Samples this process's resident memory in a background thread (ru_maxrss is process-lifetime)."""

    def __init__(self, interval: float = 0.2) -> None:
        self._process = psutil.Process(os.getpid())
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@dataclass
class PartMeter:
    """The share of a meter spent in one part of the work (e.g. the QA tasks, the `lm` task), with
    the unit its cost is normalised by (per 1,000 questions, per 1,000 tokens)."""

    name: str
    unit: str
    units: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    def metrics(self, cpu_hour_usd: float, gpu_hour_usd: float) -> dict[str, float]:
        cost = self.cpu_s / 3600 * cpu_hour_usd + self.gpu_s / 3600 * gpu_hour_usd
        values = {
            "wall_s": self.wall_s, "cpu_s": self.cpu_s, "gpu_s": self.gpu_s, "cost_usd": cost,
            "flops": self.counters["flops"], "retrieval_calls": self.counters["retrieval_calls"], self.unit: self.units,
        }
        if self.units:
            per_1k = 1000.0 / self.units
            values.update({
                f"wall_s_per_1k_{self.unit}": self.wall_s * per_1k,
                f"cost_usd_per_1k_{self.unit}": cost * per_1k,
                f"flops_per_1k_{self.unit}": self.counters["flops"] * per_1k,
            })
        return values


@dataclass
class CostMeter:
    """Context manager: `with CostMeter("inference") as meter: ...; meter.add(tokens_prompt=...)`."""

    phase: Phase = "stage"
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))
    params_total: int = 0
    params_trainable: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    gpu_s: float = 0.0
    gpu_peak_mb: float = 0.0
    parts: dict[str, PartMeter] = field(default_factory=dict)
    _start_wall: float = 0.0
    _start_cpu: float = 0.0
    _rss: _PeakRSS | None = None
    _cuda: bool = False
    _exited: bool = False

    def __enter__(self) -> CostMeter:
        self._exited = False
        self._cuda = _cuda_in_use()
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._rss = _PeakRSS().__enter__()
        self._start_wall = time.perf_counter()
        self._start_cpu = _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self._exited = True
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        self.wall_s += time.perf_counter() - self._start_wall
        self.cpu_s += _cpu_seconds() - self._start_cpu
        if self._cuda:
            self.gpu_s = self.wall_s  # the GPU is held for the whole metered block
        assert self._rss is not None
        self._rss.__exit__()
        self.peak_rss_mb = max(self.peak_rss_mb, self._rss.peak / 2**20)

    def snapshot(self) -> dict[str, object]:
        """Counters and wall/CPU seconds so far (also inside the block): what a checkpoint stores."""
        inside = self._rss is not None and not self._exited
        wall = self.wall_s + (time.perf_counter() - self._start_wall if inside else 0.0)
        cpu = self.cpu_s + (_cpu_seconds() - self._start_cpu if inside else 0.0)
        return {"counters": dict(self.counters), "wall_s": wall, "cpu_s": cpu}

    def restore(self, snapshot: dict[str, object]) -> None:
        """Add an earlier (interrupted) attempt's `snapshot()` to this meter: counters replace the
        current ones' starting point, seconds are added."""
        for key, value in dict(snapshot["counters"]).items():  # type: ignore[arg-type]
            self.counters[key] = self.counters.get(key, 0.0) + float(value)
        self.wall_s += float(snapshot["wall_s"])  # type: ignore[arg-type]
        self.cpu_s += float(snapshot["cpu_s"])  # type: ignore[arg-type]

    def add(self, **counts: float) -> None:
        for key, value in counts.items():
            if key not in self.counters:
                raise KeyError(f"unknown cost counter '{key}' (known: {', '.join(COUNTERS)})")
            self.counters[key] += float(value)

    @contextlib.contextmanager
    def part(self, name: str, unit: str) -> Iterator[PartMeter]:
        """Meter a part of the work inside this (entered) meter separately: its wall, CPU and GPU
        seconds and the counters added meanwhile go to `parts[name]` as well as to the whole.
        Set `part.units` (questions, tokens) for its per-1,000 cost keys. Parts must not overlap."""
        part = self.parts.setdefault(name, PartMeter(name, unit))
        if part.unit != unit:
            raise ValueError(f"cost part '{name}' is counted in {part.unit}, not {unit}")
        counters = dict(self.counters)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield part
        finally:
            elapsed = time.perf_counter() - wall
            part.wall_s += elapsed
            part.cpu_s += _cpu_seconds() - cpu
            if self._cuda:
                part.gpu_s += elapsed
            for key, value in self.counters.items():
                part.counters[key] += value - counters[key]

    def set_params(self, total: int, trainable: int = 0) -> None:
        self.params_total, self.params_trainable = int(total), int(trainable)

    def metrics(self, cpu_hour_usd: float = 0.05, gpu_hour_usd: float = 2.5) -> dict[str, float]:
        """Flat MLflow metrics: `{phase}/wall_s`, `{phase}/tokens_prompt`, ..., `{phase}/cost_usd`,
        and for each part `{phase}/{part}/wall_s`, `.../cost_usd`, `.../cost_usd_per_1k_{unit}`, ...
        (e.g. `inference/qa/cost_usd_per_1k_questions`, `inference/lm/cost_usd_per_1k_tokens`)."""
        values = {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "peak_rss_mb": self.peak_rss_mb,
            "gpu_s": self.gpu_s,
            "gpu_peak_mb": self.gpu_peak_mb,
            "params_total": float(self.params_total),
            "params_trainable": float(self.params_trainable),
            "cost_usd": self.cpu_s / 3600 * cpu_hour_usd + self.gpu_s / 3600 * gpu_hour_usd,
            **self.counters,
        }
        for name, part in sorted(self.parts.items()):
            values.update({f"{name}/{key}": value for key, value in part.metrics(cpu_hour_usd, gpu_hour_usd).items()})
        return {f"{self.phase}/{key}": float(value) for key, value in values.items()}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cuda_in_use() -> bool:
    import sys

    if "torch" not in sys.modules:  # never import torch just to ask
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()
