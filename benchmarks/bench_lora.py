"""A LoRA training step through ragops's loop vs a bare torch step, on SmolLM2 and the same batches.

The batches are SELF-RAG generator examples (`self_rag.generator_example`: the shared QA prompt,
`[Retrieval]<paragraph>passage</paragraph>[Relevant] answer [Fully supported][Utility:5]`, prompt and
passage masked) built from corpus entries; the model is SmolLM2 with the 15 reflection tokens added
and LoRA r=16 on every linear layer plus the new token rows (`finetune.lora_model`). Three ways to
take the same optimizer steps, alternated in rounds so that machine-load drift hits all alike:

- `ragops`: `ragops.training.loop.train` with `self_rag.SequenceTask` (AdamW, warm-up/decay,
  clipping, cost charging, the report callback, a resumable checkpoint every 5 steps);
- `bare`: a plain torch loop (AdamW, clipping) calling the same loss (`finetune.causal_lm_loss`:
  the vocabulary projection only on loss positions) — the ratio bare/ragops time is the loop's
  overhead (target ≥ 0.8);
- `bare_hf`: a plain torch loop with the usual Hugging Face loss (`labels` with -100: logits for
  every position) — what a hand-written fine-tuning script would do.

    .venv/bin/python benchmarks/bench_lora.py [--lm-dir artifacts/models/lm] [--steps 3] [--batch 4] [--rounds 2]

Writes benchmarks/results/lora.json. On a shared machine compare the ratios (measured back to back),
not the absolute speeds; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragops.env import configure_environment  # noqa: E402

configure_environment(ROOT)

import torch  # noqa: E402

from ragops.architectures.prompts import answer_continuation, qa_prompt  # noqa: E402
from ragops.architectures.self_rag import REFLECTION_TOKENS, SequenceTask, generator_example  # noqa: E402
from ragops.config import OptimizerOptions  # noqa: E402
from ragops.cost import CostMeter  # noqa: E402
from ragops.io import write_json  # noqa: E402
from ragops.lm.finetune import add_special_tokens, causal_lm_loss, lora_model  # noqa: E402
from ragops.resources import default_corpus_file  # noqa: E402
from ragops.training.loop import train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def examples(lm, n: int, seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """SELF-RAG retrieval examples from corpus entries: question = the entry's title, answer = its first words."""
    entries = list(json.loads(default_corpus_file().read_text(encoding="utf-8")).values())
    random.Random(seed).shuffle(entries)
    ids = dict(zip(REFLECTION_TOKENS, [lm.tokenizer.convert_tokens_to_ids(t) for t in REFLECTION_TOKENS], strict=True))
    chat = lm.chat_formatter
    terminator = [lm.tokenizer.eos_token_id]
    out = []
    for e in entries[:n]:
        words = e["extract"].split()
        prompt = lm.encode(qa_prompt(f"What is {e['title']}?", [], chat))
        passage = lm.encode(f"{e['title']}\n{' '.join(words[:90])}")
        answer = lm.encode(answer_continuation(" ".join(words[:9]), chat=chat is not None))
        out.append(generator_example(prompt, answer, terminator, ids, passage=passage))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm-dir", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ragops.lm import CausalLM, prepare_lm

    tmp = tempfile.TemporaryDirectory()
    lm_dir = args.lm_dir
    if lm_dir is None:
        prepare_lm("default", Path(tmp.name) / "lm")
        lm_dir = str(Path(tmp.name) / "lm")
    lm = CausalLM.load(lm_dir, device="auto")
    token_ids = add_special_tokens(lm, REFLECTION_TOKENS)
    torch.manual_seed(0)
    model = lora_model(lm, r=16, alpha=32, dropout=0.05, trainable_token_ids=token_ids)
    model.train()
    data = examples(lm, args.steps * args.batch)
    batches = [data[i : i + args.batch] for i in range(0, len(data), args.batch)]
    tokens = sum(len(s) for s, _ in data)
    loss_tokens = sum(sum(m[1:]) for _, m in data)
    params = [p for p in model.parameters() if p.requires_grad]
    options = OptimizerOptions(steps=args.steps, batch_size=args.batch, lr=2e-4, warmup=0.1, checkpoint_every=5)

    def ragops_run(round_: int) -> None:
        # the task's batches come from its own seeded order: give it exactly `batches`, in order
        task = SequenceTask(lm, model, data, options, seed=0, meter=CostMeter())
        task.micro_batch = lambda step, micro: batches[step]
        train(task, options, seed=0, checkpoint=Path(tmp.name) / f"bench-{round_}.ckpt", settings={"bench": True},
              meter=CostMeter(), report=lambda step, metrics: None, progress=False)
        model.train()

    def bare_run(_: int) -> None:
        optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = causal_lm_loss(model, [s for s, _ in batch], [m for _, m in batch], lm.pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    def bare_hf_run(_: int) -> None:
        optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
        for batch in batches:
            width = max(len(s) for s, _ in batch)
            ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for b, (seq, mask) in enumerate(batch):
                ids[b, : len(seq)] = torch.tensor(seq)
                attention[b, : len(seq)] = 1
                labels[b, : len(seq)] = torch.tensor([t if m else -100 for t, m in zip(seq, mask, strict=True)])
            optimizer.zero_grad(set_to_none=True)
            out = model(input_ids=ids.to(lm.device), attention_mask=attention.to(lm.device), labels=labels.to(lm.device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    runs = {"ragops": ragops_run, "bare": bare_run, "bare_hf": bare_hf_run}
    seconds = {name: [] for name in runs}
    loads = [load_average()]
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name](r)
            seconds[name].append(time.perf_counter() - start)
            print(f"round {r} {name}: {seconds[name][-1]:.2f} s", flush=True)
        loads.append(load_average())
    mean = {k: sum(v) / len(v) for k, v in seconds.items()}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lm": lm.name, "device": str(lm.device),
        "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
        "tokens_per_step": tokens / len(batches), "loss_tokens_per_step": loss_tokens / len(batches),
        "trainable_params": sum(p.numel() for p in params), "load_average": loads,
        "seconds_per_run": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "tokens_per_second": {k: round(tokens / v, 1) for k, v in mean.items()},
        "ratio_bare_over_ragops": round(mean["bare"] / mean["ragops"], 3),  # ≥ 0.8: the loop costs ≤ 25 % extra
        "ratio_bare_hf_over_ragops": round(mean["bare_hf"] / mean["ragops"], 3),
        "target": 0.8,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "lora.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
