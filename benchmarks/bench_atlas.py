"""Atlas training cost per question, by component, on the real LM: what sizes `architectures.atlas`.

On a prepared workspace (chunks, index, benchmark and `artifacts/models/lm`), for batches of
train-split questions with their top-K passages (K = `--k`), it times side by side (each round runs
every component once on the same batch, in rotating order, so machine-load drift hits all alike):

- `score`: a no-grad scoring forward of the reader's inputs (K passages + question + answer) —
  the anchor every other figure is a ratio to;
- `reader`: the LoRA reader's forward + backward on the same inputs (the reader loss);
- `pdist` (= `emdr`: the same single-passage forwards), `loop`, `adist`: each loss's gold signal
  from the current reader (no grad);
- `retriever`: the query tower's forward + backward for the retrieval scores (query-side);
- `candidates`: retrieving the top-K (query encoding without grad + FAISS).

    .venv/bin/python benchmarks/bench_atlas.py --workspace <ws> [--questions 16] [--batch 2] [--k 4] [--rounds 2]

Writes benchmarks/results/atlas.json and prints a markdown table: seconds per question (under
whatever load the machine had) and the ratio of each component to `score`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ragops.env import configure_environment

ROOT = Path(__file__).resolve().parents[1]
configure_environment(ROOT)
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ragops.architectures.atlas import AtlasOptions, AtlasTask  # noqa: E402
from ragops.evaluation.runner import build_architecture  # noqa: E402
from ragops.io import write_json  # noqa: E402
from ragops.lm.finetune import causal_lm_loss, lora_model  # noqa: E402
from ragops.params import load_config  # noqa: E402
from ragops.paths import Workspace  # noqa: E402
from ragops.training.loop import TrainRun  # noqa: E402
from ragops.training.retriever import RetrieverSetup, evaluating, retrieval_examples  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    ws = Workspace(Path(args.workspace))
    config = load_config(ws.params)
    options = AtlasOptions(k=args.k)
    arch = build_architecture("atlas", ws, config, progress=False, options=options)
    arch._base_only = True
    lm = arch.ctx.lm
    train, _ = retrieval_examples(ws, qa_per_task=args.questions // 2, lm_windows=0, encode=lm.encode, decode=lm.decode,
                                  prefix_tokens=1, target_tokens=1, seed=config.seed, dev_fraction=0.0)
    train = train[: args.questions]
    setup = RetrieverSetup(ws, config, "query_side", meter=None, device="cpu")
    torch.manual_seed(0)
    model = lora_model(lm, r=options.lora_r, alpha=options.lora_alpha, dropout=options.lora_dropout)
    model.train()
    setup.retriever.query_model.train()
    tasks = {mode: AtlasTask(type(arch)(arch.ctx, options.model_copy(update={"retriever_loss": mode})), lm, model, setup, train, [],
                             TrainRun(progress=False)) for mode in ("pdist", "loop", "adist")}
    task = tasks["pdist"]
    batches = [train[i : i + args.batch] for i in range(0, len(train), args.batch)]
    prepared = [task.prepare(b) for b in batches]
    tokens = sum(len(p) + len(t) for b in prepared for p, t in zip(b["prompts"], b["targets"], strict=True))

    def score(batch):
        with evaluating(model):
            lm.score_ids(batch["prompts"], batch["targets"])

    def reader(batch):
        sequences = [p + t for p, t in zip(batch["prompts"], batch["targets"], strict=True)]
        masks = [[False] * len(p) + [True] * len(t) for p, t in zip(batch["prompts"], batch["targets"], strict=True)]
        loss, _ = causal_lm_loss(model, sequences, masks, lm.pad_id)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def retriever(batch):
        task._retrieval_scores(batch).logsumexp(dim=-1).sum().backward()
        setup.retriever.query_model.zero_grad(set_to_none=True)

    components = {
        "score": score,
        "reader": reader,
        "pdist": lambda b: tasks["pdist"].gold_signals(b),
        "loop": lambda b: tasks["loop"].gold_signals(b),
        "adist": lambda b: tasks["adist"].gold_signals(b),
        "retriever": retriever,
        "candidates": lambda b: setup.candidates(b["examples"], args.k),
    }
    seconds = {name: [] for name in components}
    names = list(components)
    loads = [load_average()]
    for r in range(args.rounds):
        for i, batch in enumerate(prepared):
            shift = (r * len(prepared) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                components[name](batch)
                seconds[name].append(time.perf_counter() - start)
                print(f"round {r} batch {i} {name}: {seconds[name][-1]:.2f} s", flush=True)
        loads.append(load_average())
    n = len(train)
    per_question = {name: sum(v) / args.rounds / n for name, v in seconds.items()}
    anchor = per_question["score"]
    ratio = {name: value / anchor for name, value in per_question.items()}
    step = {mode: per_question["reader"] + per_question[mode] + per_question["retriever"] + per_question["candidates"]
            for mode in ("pdist", "loop", "adist")}
    step["none"] = per_question["reader"] + per_question["candidates"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lm": str(lm.name), "k": args.k, "questions": n, "batch": args.batch, "rounds": args.rounds,
        "mean_reader_input_tokens": tokens / n, "load_average": loads,
        "seconds_per_question": {k: round(v, 4) for k, v in per_question.items()},
        "ratio_to_score": {k: round(v, 3) for k, v in ratio.items()},
        "training_seconds_per_question": {k: round(v, 4) for k, v in step.items()},
        "training_ratio_to_score": {k: round(v / anchor, 3) for k, v in step.items()},
        "median_batch_seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "atlas.json", result)
    print(f"reader input: {tokens / n:.0f} tokens per question (K = {args.k}); load average {loads}")
    print("| component | s/question (loaded) | ratio to no-grad scoring |\n|---|---:|---:|")
    for name in components:
        print(f"| {name} | {per_question[name]:.3f} | {ratio[name]:.2f} |")
    for mode, value in step.items():
        print(f"| training step, {mode} | {value:.3f} | {value / anchor:.2f} |")


if __name__ == "__main__":
    main()
