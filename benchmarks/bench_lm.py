"""LM throughput on this machine: ragops' scoring path vs a bare batched forward, and the lm task.

1. Scoring: tokens/s of `CausalLM.score_ids` vs a bare batched forward of the same model on the
   same token sequences with the same batching (sorted by length, `batch_tokens` padded tokens per
   batch, full logits, nothing else), plus a naive one-sequence-at-a-time scorer for reference.
   Two workloads: whole documents (every token scored) and QA prompts (two passages + question,
   the gold answer scored). Runs alternate bare/score/naive `--repeats` times; medians reported.
2. Shared prompt: `score_and_generate` (gold NLL and greedy answer from one prompt forward) vs
   `score` then `generate`.
3. Language modelling on held-out-style documents: the plain LM (closed book) vs strided
   In-Context RALM (BM25 over other corpus summaries): wall time per document, scored document
   tokens/s and LM tokens/s, with and without merging consecutive windows that share a passage.

    .venv/bin/python benchmarks/bench_lm.py [--lm-dir artifacts/models/lm] [--repeats 3] [--docs 4]

Without a prepared LM folder it prepares SmolLM2 from the packaged GGUF into a temp dir first.
Writes benchmarks/results/lm.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ragops.env import configure_environment  # offline hub, telemetry off: the same settings as the CLI

configure_environment(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragops.architectures.base import ArchitectureContext  # noqa: E402
from ragops.architectures.closed_book import ClosedBook  # noqa: E402
from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions  # noqa: E402
from ragops.params import resolve  # noqa: E402
from ragops.cost import CostMeter  # noqa: E402
from ragops.architectures.prompts import document_text  # noqa: E402
from ragops.evaluation.metrics import perplexities  # noqa: E402
from ragops.architectures.prompts import answer_continuation, qa_prompt  # noqa: E402
from ragops.io import write_json  # noqa: E402
from ragops.lm import CausalLM, prepare_lm  # noqa: E402
from ragops.paths import Workspace  # noqa: E402
from ragops.resources import default_corpus_file  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_entries(seed: int = 0) -> list[dict]:
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    entries = [e for e in data.values() if e.get("description")]
    random.Random(seed).shuffle(entries)
    return entries


def workloads(lm: CausalLM, entries: list[dict], n_docs: int, n_qa: int) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    docs = [lm.encode(document_text(e["title"], e["extract"])) for e in entries[:n_docs]]
    chat = lm.chat_formatter
    qa_ctx, qa_cont = [], []
    for i, e in enumerate(entries[n_docs : n_docs + n_qa]):
        other = entries[n_docs + n_qa + i]
        passages = [f"{e['title']}\n{e['extract']}", f"{other['title']}\n{other['extract']}"]
        qa_ctx.append(lm.encode(qa_prompt(f"What is {e['title']}?", passages, chat)))
        qa_cont.append(lm.encode(answer_continuation(e["description"], chat=chat is not None)))
    return {"documents": ([[] for _ in docs], docs), "qa_prompts": (qa_ctx, qa_cont)}


def sequences(lm: CausalLM, contexts, continuations) -> list[list[int]]:
    """The exact token sequences the scoring path runs (context left-truncated, start token if empty)."""
    out = []
    for context, cont in zip(contexts, continuations, strict=True):
        context = context or [lm.start_id]
        out.append(context[-(lm.max_length - len(cont)) :] + cont)
    return out


class Clock:
    """Wall and process-CPU seconds of a block. On a shared machine the CPU seconds are the steadier
    figure: other processes stretch wall time, much less the CPU time this process needs."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def bare_forward(lm: CausalLM, seqs: list[list[int]]) -> Clock:
    """A bare batched forward (full logits) over `seqs` with the scoring path's batching."""
    ordered = sorted(seqs, key=len, reverse=True)
    with Clock() as clock, torch.inference_mode():
        for batch in lm._batches(ordered, len):
            ids, mask, positions = lm._left_pad(batch, len(batch[0]))
            lm.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return clock


def ragops_score(lm: CausalLM, contexts, continuations) -> Clock:
    with Clock() as clock:
        lm.score_ids(contexts, continuations)
    return clock


def naive_score(lm: CausalLM, contexts, continuations) -> Clock:
    """One sequence at a time, full forward and log-softmax over every position."""
    with Clock() as clock, torch.inference_mode():
        for seq, cont in zip(sequences(lm, contexts, continuations), continuations, strict=True):
            logp = torch.log_softmax(lm.model(torch.tensor([seq])).logits[0].float(), dim=-1)
            n = len(cont)
            logp[len(seq) - n - 1 : len(seq) - 1].gather(1, torch.tensor(cont)[:, None])
    return clock


def bench_scoring(lm: CausalLM, work, repeats: int) -> dict:
    out = {}
    for name, (contexts, continuations) in work.items():
        seqs = sequences(lm, contexts, continuations)
        tokens = sum(len(s) for s in seqs)
        runs: dict[str, list[Clock]] = {"bare": [], "score": [], "naive": []}
        lm.score_ids(contexts[:4], continuations[:4])  # warm-up
        bare_forward(lm, seqs[:4])
        for r in range(repeats):  # interleaved, alternating the order, so load changes hit all three alike
            order = ["bare", "score", "naive"] if r % 2 == 0 else ["score", "bare", "naive"]
            for kind in order:
                if kind == "bare":
                    runs[kind].append(bare_forward(lm, seqs))
                elif kind == "score":
                    runs[kind].append(ragops_score(lm, contexts, continuations))
                else:
                    runs[kind].append(naive_score(lm, contexts, continuations))
        wall = {k: statistics.median(c.wall for c in v) for k, v in runs.items()}
        cpu = {k: statistics.median(c.cpu for c in v) for k, v in runs.items()}
        out[name] = {
            "sequences": len(seqs),
            "tokens": tokens,
            "scored_tokens": sum(len(c) for c in continuations),
            "mean_length": tokens / len(seqs),
            "wall_s": {k: [round(c.wall, 3) for c in v] for k, v in runs.items()},
            "cpu_s": {k: [round(c.cpu, 3) for c in v] for k, v in runs.items()},
            "tokens_per_s": {k: round(tokens / v, 1) for k, v in wall.items()},
            "tokens_per_cpu_s": {k: round(tokens / v, 1) for k, v in cpu.items()},
            "score_vs_bare": round(wall["bare"] / wall["score"], 3),
            "score_vs_bare_cpu": round(cpu["bare"] / cpu["score"], 3),
            "score_vs_naive": round(wall["naive"] / wall["score"], 3),
        }
    return out


def bench_shared_prompt(lm: CausalLM, contexts, continuations, max_new_tokens: int = 16) -> dict:
    prompts = contexts
    lm.score_and_generate_ids(prompts[:2], continuations[:2], max_new_tokens=2)  # warm-up
    before = lm.counters.snapshot()
    start = time.perf_counter()
    scores_a, texts_a = lm.score_and_generate_ids(prompts, continuations, max_new_tokens=max_new_tokens)
    joint_s = time.perf_counter() - start
    joint = lm.counters.since(before)
    before = lm.counters.snapshot()
    start = time.perf_counter()
    scores_b = lm.score_ids(prompts, continuations)
    texts_b = lm.score_and_generate_ids(prompts, None, max_new_tokens=max_new_tokens)[1]
    separate_s = time.perf_counter() - start
    separate = lm.counters.since(before)
    assert texts_a == texts_b
    assert all(np.allclose(a, b, atol=1e-3) for a, b in zip(scores_a, scores_b, strict=True))
    generated = joint["tokens_generated"]
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "joint": {"seconds": round(joint_s, 3), "tokens_forward": joint["tokens_forward"], "flops": joint["flops"]},
        "separate": {"seconds": round(separate_s, 3), "tokens_forward": separate["tokens_forward"], "flops": separate["flops"]},
        "speedup": round(separate_s / joint_s, 3),
        "generated_tokens": generated,
        "generation_tokens_per_s": round(generated / max(joint_s, 1e-9), 1),
    }


def bench_lm_task(lm: CausalLM, entries: list[dict], n_docs: int, n_index: int) -> dict:
    from ragops.retrieval.index import build_bm25
    from ragops.retrieval.retriever import BM25Retriever

    held = entries[-n_docs:]
    indexed = entries[-(n_docs + n_index) : -n_docs]
    chunks = pd.DataFrame(
        {
            "chunk_id": [f"d{i}#0000" for i in range(len(indexed))],
            "doc_id": [f"d{i}" for i in range(len(indexed))],
            "title": [e["title"] for e in indexed],
            "text": [e["extract"] for e in indexed],
        }
    )
    start = time.perf_counter()
    bm25 = BM25Retriever(build_bm25([f"{t}\n{x}" for t, x in zip(chunks["title"], chunks["text"], strict=True)]), chunks)
    bm25_build_s = time.perf_counter() - start
    docs = pd.DataFrame({"doc_id": [f"h{i}" for i in range(n_docs)], "title": [e["title"] for e in held], "text": [e["extract"] for e in held]})
    ws = Workspace(tempfile.mkdtemp(prefix="bench-lm-"))
    config = resolve({})
    doc_tokens = sum(len(lm.encode(document_text(t, x))) for t, x in zip(docs["title"], docs["text"], strict=True))
    words = sum(len(document_text(t, x).split()) for t, x in zip(docs["title"], docs["text"], strict=True))

    def run(name: str, arch) -> dict:
        meter = CostMeter("inference")
        before = lm.counters.snapshot()
        with Clock() as clock, meter:
            table = arch.score_documents(docs, meter)
        seconds = clock.wall
        spent = lm.counters.since(before)
        token_ppl, word_ppl = perplexities(float(table["nll_sum"].sum()), doc_tokens, words)
        row = {
            "setting": name,
            "seconds": round(seconds, 2),
            "seconds_per_doc": round(seconds / len(docs), 2),
            "cpu_s": round(clock.cpu, 2),
            "doc_tokens_per_s": round(doc_tokens / seconds, 1),
            "lm_tokens": int(spent["tokens_forward"]),
            "lm_tokens_per_s": round(spent["tokens_forward"] / seconds, 1),
            "padding_tokens": int(spent["tokens_padded"]),
            "retrieval_calls": int(meter.counters["retrieval_calls"]),
            "lm_windows": int(table["lm_windows"].sum()) if "lm_windows" in table else len(docs),
            "gflops": round(spent["flops"] / 1e9, 1),
            "token_ppl": round(token_ppl, 3),
            "word_ppl": round(word_ppl, 3),
        }
        print(f"  {name}: {row['seconds']} s, ppl {row['token_ppl']}", flush=True)
        return row

    def ralm(**options) -> InContextRALM:
        ctx = ArchitectureContext(ws, config, ws.architecture_dir("incontext_ralm"), progress=False, lm_override=lm, retrievers={"bm25": bm25})
        return InContextRALM(ctx, InContextRALMOptions(cache_retrieval=False, **options))

    rows = [run("closed_book (plain LM)", ClosedBook(ArchitectureContext(ws, config, ws.architecture_dir("closed_book"), progress=False, lm_override=lm)))]
    rows.append(run("ralm s=16 q=32 merged", ralm(stride=16, query_length=32)))
    rows.append(run("ralm s=16 q=32 per-window", ralm(stride=16, query_length=32, merge_windows=False)))
    rows.append(run("ralm s=4 q=32 merged", ralm(stride=4, query_length=32)))
    return {"docs": n_docs, "doc_tokens": doc_tokens, "words": words, "index_docs": n_index, "bm25_build_s": round(bm25_build_s, 2), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"### LM benchmark ({result['lm']['name']}, {result['threads']} threads, {result['date']})", ""]
    lines += ["| workload | seqs | mean len | bare fwd tok/s | score tok/s | naive tok/s | score / bare (wall) | score / bare (CPU s) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in result["scoring"].items():
        t = r["tokens_per_s"]
        lines.append(f"| {name} | {r['sequences']} | {r['mean_length']:.0f} | {t['bare']} | {t['score']} | {t['naive']} | "
                     f"{r['score_vs_bare']} | {r['score_vs_bare_cpu']} |")
    s = result["shared_prompt"]
    lines += ["", f"score_and_generate vs score + generate ({s['prompts']} QA prompts, {s['max_new_tokens']} new tokens): "
              f"{s['joint']['seconds']} s vs {s['separate']['seconds']} s ({s['speedup']}x), LM tokens {s['joint']['tokens_forward']} vs "
              f"{s['separate']['tokens_forward']}; generation {s['generation_tokens_per_s']} tok/s incl. the prompt forward.", ""]
    lm_task = result["lm_task"]
    lines += [f"lm task, {lm_task['docs']} documents ({lm_task['doc_tokens']} tokens), BM25 over {lm_task['index_docs']} summaries:", "",
              "| setting | s/doc | doc tok/s | LM tokens | LM tok/s | windows | retrievals | token ppl | word ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lm_task["rows"]:
        lines.append(f"| {r['setting']} | {r['seconds_per_doc']} | {r['doc_tokens_per_s']} | {r['lm_tokens']} | {r['lm_tokens_per_s']} | "
                     f"{r['lm_windows']} | {r['retrieval_calls']} | {r['token_ppl']} | {r['word_ppl']} |")
    lines += ["", f"load average before/after: {result['load_before']} / {result['load_after']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-dir", default=str(ROOT / "artifacts" / "models" / "lm"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=4, help="documents for the lm-task comparison")
    parser.add_argument("--score-docs", type=int, default=24)
    parser.add_argument("--qa", type=int, default=32)
    parser.add_argument("--index-docs", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "lm.json"))
    args = parser.parse_args()

    lm_dir = Path(args.lm_dir)
    prepared = None
    if not (lm_dir / "config.json").exists():
        lm_dir = Path(tempfile.mkdtemp(prefix="bench-smollm2-")) / "lm"
        prepared = prepare_lm("default", lm_dir)
        print(f"prepared SmolLM2 in {prepared['seconds']} s", flush=True)
    start = time.perf_counter()
    lm = CausalLM.load(lm_dir, device="cpu", threads=args.threads)
    load_s = time.perf_counter() - start
    load_before = os.getloadavg()
    entries = load_entries()
    work = workloads(lm, entries, args.score_docs, args.qa)
    print("scoring ...", flush=True)
    scoring = bench_scoring(lm, work, args.repeats)
    print("shared prompt ...", flush=True)
    shared = bench_shared_prompt(lm, *work["qa_prompts"])
    print("lm task ...", flush=True)
    lm_task = bench_lm_task(lm, entries, args.docs, args.index_docs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "lm": {"name": "SmolLM2-135M-Instruct", "dir": str(lm_dir), "params": lm.n_params, "load_s": round(load_s, 3),
               "prepare_s": prepared["seconds"] if prepared else None, "max_length": lm.max_length, "batch_tokens": lm.batch_tokens},
        "scoring": scoring,
        "shared_prompt": shared,
        "lm_task": lm_task,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
