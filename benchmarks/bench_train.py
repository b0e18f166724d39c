"""The training substrate's overheads on this machine, measured side by side in one process.

1. Loop: `ragops.training.loop.train` (AdamW, schedule, clipping, accumulation, the report
   callback, a checkpoint every 5 steps) vs a bare torch loop doing the same forward/backward/step
   on the same model and batches — a MiniLM retriever contrastive step (queries + passages
   through the trainable tower). Steps/s, alternating bare/loop runs; target ratio >= 0.8.
2. Index refresh: `IndexRefresher` (sync) re-embedding N chunks with a passage-encoder snapshot
   and building a Flat index vs a bare `SentenceTransformer.encode` + `faiss.IndexFlatIP.add` of
   the same chunks; target ratio >= 0.9.
3. Async vs sync refresh: wall time of a short retriever training (refresh every 2 steps) with
   the refresh in the background (swapped 2 steps later) vs blocking; target async <= sync.
4. Ensemble decoding (REPLUG, k documents mixed per step) vs k separate greedy decodes of the
   same prompts: wall time and FLOPs, on SmolLM2 (prepared into a temp dir when not given).

    .venv/bin/python benchmarks/bench_train.py [--chunks 600] [--steps 12] [--repeats 2] [--lm-dir artifacts/models/lm]

Writes benchmarks/results/train.json and prints a summary. Numbers are from a shared 2-core
machine: compare the ratios, which are measured back to back, not the absolute speeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragops.env import configure_environment  # noqa: E402

configure_environment(ROOT)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragops.config import OptimizerOptions  # noqa: E402
from ragops.io import write_json  # noqa: E402
from ragops.resources import default_corpus_file  # noqa: E402
from ragops.retrieval.embed import Encoder  # noqa: E402
from ragops.retrieval.trainable import TrainableRetriever  # noqa: E402
from ragops.training.loop import cycle_batches, train  # noqa: E402
from ragops.training.refresh import IndexRefresher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    entries = list(data.values())
    random.Random(seed).shuffle(entries)
    return [f"{e['title']}\n{' '.join(e['extract'].split()[:90])}" for e in entries[:n]]


class ContrastiveTask:
    """8 queries x (1 positive + 3 negatives) per step, in-batch softmax on cosine / 0.05."""

    def __init__(self, retriever: TrainableRetriever, texts: list[str], batch: int = 8) -> None:
        self.retriever, self.texts, self.batch = retriever, texts, batch
        self.batches = cycle_batches(len(texts) // 4, batch, seed=0)

    def rows(self, step: int) -> list[int]:
        return self.batches(step)

    def compute(self, rows: list[int]) -> torch.Tensor:
        queries = [self.texts[4 * r].split("\n")[0] for r in rows]
        passages = [self.texts[4 * r + j] for r in rows for j in range(4)]
        q = self.retriever.embed_queries(queries)
        p = self.retriever.embed_passages(passages)
        logits = q @ p.T / 0.05
        target = torch.arange(len(rows)) * 4
        return torch.nn.functional.cross_entropy(logits, target)

    # TrainingTask
    def modules(self):
        return self.retriever.modules()

    def param_groups(self):
        return None

    def micro_batch(self, step, micro):
        return self.rows(step)

    def loss(self, rows):
        loss = self.compute(rows)
        return loss, {"train/contrastive": float(loss.detach())}

    def evaluate(self):
        return {}

    def after_step(self, step):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def bench_loop(encoder: Encoder, texts: list[str], steps: int, repeats: int) -> dict:
    options = OptimizerOptions(steps=steps, batch_size=8, lr=2e-5, warmup=0.1, checkpoint_every=5, clip_norm=1.0)
    bare_times, loop_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            # bare: the same model copy, batches, optimizer, schedule and clipping, nothing else
            task = ContrastiveTask(TrainableRetriever(encoder, "shared"), texts)
            model = task.retriever.query_model
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr, weight_decay=options.weight_decay)
            start = time.perf_counter()
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = task.compute(task.rows(step))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            bare_times.append(time.perf_counter() - start)
            task = ContrastiveTask(TrainableRetriever(encoder, "shared"), texts)
            reported = []
            start = time.perf_counter()
            train(task, options, seed=0, checkpoint=Path(tmp) / f"bench-{r}.ckpt", report=lambda s, m: reported.append(m), progress=False)
            loop_times.append(time.perf_counter() - start)
    bare, loop = statistics.median(bare_times), statistics.median(loop_times)
    return {"steps": steps, "bare_steps_per_s": steps / bare, "loop_steps_per_s": steps / loop, "ratio": bare / loop,
            "bare_s": bare_times, "loop_s": loop_times}


def bench_refresh(encoder: Encoder, texts: list[str], repeats: int) -> dict:
    retriever = TrainableRetriever(encoder, "shared")
    refresher = IndexRefresher(texts, retriever.passage_model, np.zeros((len(texts), encoder.dim), np.float32), mode="sync")
    snapshot = retriever.passage_state()
    bare_model = copy.deepcopy(retriever.passage_model).eval()
    bare_times, refresh_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            vectors = bare_model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        refresher.start(0, snapshot)
        refresh_times.append(time.perf_counter() - start)
    max_diff = float(np.abs(refresher.vectors - vectors).max())
    bare, refresh = statistics.median(bare_times), statistics.median(refresh_times)
    return {"chunks": len(texts), "bare_texts_per_s": len(texts) / bare, "refresh_texts_per_s": len(texts) / refresh,
            "ratio": bare / refresh, "max_abs_diff": max_diff, "bare_s": bare_times, "refresh_s": refresh_times}


class RefreshingTask(ContrastiveTask):
    def __init__(self, retriever, texts, refresher: IndexRefresher, every: int) -> None:
        super().__init__(retriever, texts)
        self.refresher, self.every = refresher, every

    def after_step(self, step):
        self.refresher.poll(step)
        if step % self.every == 0:
            self.refresher.start(step, self.retriever.passage_state())
        return {}


def bench_async(encoder: Encoder, texts: list[str], steps: int) -> dict:
    options = OptimizerOptions(steps=steps, batch_size=8, lr=2e-5, checkpoint_every=1000)
    out = {}
    for mode in ("sync", "async", "sync", "async"):
        retriever = TrainableRetriever(encoder, "shared")
        refresher = IndexRefresher(texts, retriever.passage_model, np.zeros((len(texts), encoder.dim), np.float32), mode=mode, swap_after=2)
        task = RefreshingTask(retriever, texts, refresher, every=max(2, steps // 3))
        start = time.perf_counter()
        train(task, options, seed=0, progress=False)
        refresher.finish()
        out.setdefault(mode, []).append({"wall_s": time.perf_counter() - start, "refreshes": refresher.refreshes,
                                         "waited_s": refresher.waited_s, "refresh_s": refresher.seconds})
    sync = statistics.median(r["wall_s"] for r in out["sync"])
    asyn = statistics.median(r["wall_s"] for r in out["async"])
    return {"steps": steps, "sync": out["sync"], "async": out["async"], "async_over_sync": asyn / sync}


def bench_ensemble(lm_dir: str | None, k: int, questions: int, max_new: int) -> dict:
    from ragops.architectures.prompts import qa_prompt
    from ragops.lm import CausalLM, prepare_lm

    tmp = None
    if lm_dir is None:
        tmp = tempfile.TemporaryDirectory()
        prepare_lm("default", Path(tmp.name) / "lm")
        lm_dir = str(Path(tmp.name) / "lm")
    lm = CausalLM.load(lm_dir, device="auto")
    data = list(json.loads(default_corpus_file().read_text(encoding="utf-8")).values())
    random.Random(1).shuffle(data)
    groups = []
    for q in range(questions):
        passages = [f"{e['title']}\n{' '.join(e['extract'].split()[:60])}" for e in data[q * k : (q + 1) * k]]
        groups.append([lm.encode(qa_prompt(f"What is {data[q * k]['title']}?", [p], lm.chat_formatter)) for p in passages])
    log_w = [np.full(k, -np.log(k)) for _ in groups]
    before = lm.counters.snapshot()
    start = time.perf_counter()
    lm.score_and_generate_mixture(groups, log_w, None, max_new_tokens=max_new)
    mixture_s = time.perf_counter() - start
    mixture = lm.counters.since(before)
    before = lm.counters.snapshot()
    start = time.perf_counter()
    lm.score_and_generate_ids([p for g in groups for p in g], None, max_new_tokens=max_new)
    separate_s = time.perf_counter() - start
    separate = lm.counters.since(before)
    if tmp is not None:
        tmp.cleanup()
    return {"k": k, "questions": questions, "max_new_tokens": max_new, "mixture_s": mixture_s, "separate_s": separate_s,
            "wall_ratio": mixture_s / separate_s, "mixture_flops": mixture["flops"], "separate_flops": separate["flops"],
            "flops_ratio": mixture["flops"] / separate["flops"], "mixture_tokens_generated": mixture["tokens_generated"],
            "separate_tokens_generated": separate["tokens_generated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=600)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lm-dir", default=None)
    parser.add_argument("--skip-ensemble", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = Encoder.load("default", device="cpu")
    texts = corpus_texts(args.chunks)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch_threads": torch.get_num_threads()}
    results["loop"] = bench_loop(encoder, texts, args.steps, args.repeats)
    print(f"loop vs bare torch loop: ratio {results['loop']['ratio']:.3f}", flush=True)
    results["refresh"] = bench_refresh(encoder, texts, args.repeats)
    print(f"refresh vs bare encode + FAISS: ratio {results['refresh']['ratio']:.3f}", flush=True)
    results["async_refresh"] = bench_async(encoder, texts, args.steps)
    print(f"async / sync training wall time: {results['async_refresh']['async_over_sync']:.3f}", flush=True)
    if not args.skip_ensemble:
        results["ensemble_decoding"] = bench_ensemble(args.lm_dir, k=4, questions=8, max_new=12)
        e = results["ensemble_decoding"]
        print(f"ensemble decoding vs {e['k']} separate greedy decodes: wall {e['wall_ratio']:.3f}, FLOPs {e['flops_ratio']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "train.json", results)


if __name__ == "__main__":
    main()
