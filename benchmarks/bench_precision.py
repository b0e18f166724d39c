"""lm.precision: float32 vs bfloat16 autocast, side by side, on a workspace that has run the pipeline.

For each architecture: its QA answers (gold-answer NLL, greedy answer) on the same test questions,
read once at each precision, the two precisions taking turns going first (ABBA over repeats) so
that drift in machine load affects both; and the closed book's held-out token log-probs at both
precisions (every token of `--docs` articles), to give the per-token error of bf16 reads.

    .venv/bin/python benchmarks/bench_precision.py [--workspace .] [--questions 24] [--docs 30]
        [--architectures closed_book replug atlas retro self_rag]

Writes benchmarks/results/precision.json and prints a markdown table. Speeds are ratios measured
in one process on one machine; absolute seconds depend on the load.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ragops.env import configure_environment

ROOT = Path(__file__).resolve().parents[1]
configure_environment(ROOT)
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ragops.architectures.prompts import document_text  # noqa: E402
from ragops.cost import CostMeter  # noqa: E402
from ragops.evaluation.data import load_heldout, load_questions  # noqa: E402
from ragops.evaluation.metrics import token_f1  # noqa: E402
from ragops.evaluation.runner import build_architecture  # noqa: E402
from ragops.params import load_config  # noqa: E402
from ragops.paths import Workspace  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def with_precision(config, precision: str):
    return config.model_copy(update={"lm": config.lm.model_copy(update={"precision": precision})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".")
    parser.add_argument("--questions", type=int, default=24, help="test questions per QA task")
    parser.add_argument("--docs", type=int, default=30, help="held-out articles for the per-token error")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--architectures", nargs="+", default=["closed_book", "replug", "atlas", "retro", "self_rag"])
    args = parser.parse_args()

    ws = Workspace(Path(args.workspace).resolve())
    base = load_config(ws.params)
    questions = load_questions(ws, ["describe", "identify"], "test", args.questions)
    rows = []
    for name in args.architectures:
        archs = {p: build_architecture(name, ws, with_precision(base, p), progress=False) for p in PRECISIONS}
        for arch in archs.values():
            arch.answer(questions.iloc[:2], CostMeter("warm-up"))  # loads the model and its artifacts
        seconds = {p: [] for p in PRECISIONS}
        outputs = {}
        for repeat in range(args.repeats):
            order = PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]
            for precision in order:
                start = time.perf_counter()
                outputs[precision] = archs[precision].answer(questions, CostMeter("inference"))
                seconds[precision].append(time.perf_counter() - start)
        f32, b16 = outputs["float32"], outputs["bfloat16"]
        row = {
            "architecture": name,
            "questions": len(questions),
            "s_per_question": {p: float(np.median(seconds[p])) / len(questions) for p in PRECISIONS},
            "speedup": float(np.median(seconds["float32"]) / np.median(seconds["bfloat16"])),
            "gold_nll": {"float32": float(f32["gold_nll"].mean()), "bfloat16": float(b16["gold_nll"].mean())},
            "f1": {p: float(np.mean([token_f1(pred, gold) for pred, gold in zip(outputs[p]["prediction"], questions["answer"], strict=True)]))
                   for p in PRECISIONS},
            "same_answer": float(np.mean(f32["prediction"].to_numpy() == b16["prediction"].to_numpy())),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    docs = load_heldout(ws, "test", args.docs)
    per_token = {}
    for precision in PRECISIONS:
        lm = build_architecture("closed_book", ws, with_precision(base, precision), progress=False).lm
        ids = [lm.encode(document_text(t, x)) for t, x in zip(docs["title"], docs["text"], strict=True)]
        per_token[precision] = np.concatenate(lm.token_logprobs_batch(ids))
    difference = per_token["bfloat16"] - per_token["float32"]
    heldout = {
        "articles": len(docs), "tokens": int(difference.size),
        "nll_per_token": {p: float(-per_token[p].mean()) for p in PRECISIONS},
        "abs_diff_mean": float(np.abs(difference).mean()), "abs_diff_p99": float(np.quantile(np.abs(difference), 0.99)),
        "nll_shift_per_token": float(-difference.mean()),
    }
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "workspace": str(ws.root), "qa": rows, "heldout": heldout,
    }
    out = ROOT / "benchmarks" / "results" / "precision.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| architecture | s/question float32 | s/question bf16 | speed-up | gold NLL float32 → bf16 | F1 float32 → bf16 | same answer |")
    print("|---|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| `{r['architecture']}` | {r['s_per_question']['float32']:.3f} | {r['s_per_question']['bfloat16']:.3f} | "
              f"{r['speedup']:.2f}× | {r['gold_nll']['float32']:.3f} → {r['gold_nll']['bfloat16']:.3f} | "
              f"{r['f1']['float32']:.3f} → {r['f1']['bfloat16']:.3f} | {r['same_answer']:.2f} |")
    print(f"\nheld-out ({heldout['tokens']} tokens): NLL/token {heldout['nll_per_token']['float32']:.4f} → "
          f"{heldout['nll_per_token']['bfloat16']:.4f}; |Δ| mean {heldout['abs_diff_mean']:.4f}, p99 {heldout['abs_diff_p99']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
