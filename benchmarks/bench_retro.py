"""RETRO-fitting cost on the LM's shape: the retro-fitted forward (and a training step) vs the base
LM's forward on the same tokens. What sizes `architectures.retro.train`.

Throughput does not depend on weight values, so without a prepared LM (no hub on this machine) it
runs a randomly initialised model of SmolLM2-135M's shape (`--shape smollm2-135m`: 30 layers, d=576,
9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings); `--model PATH` uses a real
folder (e.g. artifacts/models/lm), `--shape tiny` the test model's shape. Every chunk of m tokens
gets k neighbours of r tokens (the default options: m=32, k=2, r=64, CCA layers "auto", a 2-layer
encoder). Each round times, in rotating order on the same batch:

- `base`: the base LM's no-grad forward with full-vocabulary logits (the anchor);
- `retro`: the retro-fitted no-grad forward (encoder + CCA), full-vocabulary logits;
- `train`: one RETRO-fitting micro-batch: forward + backward of the LM loss on every token, base frozen.

    .venv/bin/python benchmarks/bench_retro.py [--shape smollm2-135m | --model PATH] [--batch 8] [--tokens 128] [--rounds 3]

Writes benchmarks/results/retro.json (tokens/s, ratios to `base`, the machine's load average, and the
training minutes the default `architectures.retro` data would take at the measured rate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragops.architectures.retro import RetroLM, RetroOptions, RetroSequence, build_modules, collate, labels_of  # noqa: E402
from ragops.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "tiny": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}
DEFAULT_DECODER_TOKENS = 155_000  # params.yaml architectures.retro: 1,000 articles (<=160 tokens) + 1,000 QA prompts
# SmolLM2's no-grad forward with full-vocabulary logits on 2 quiet cores (method-designs.md §1.2, from
# benchmarks/results/lm.json's 736-1,010 tok/s scoring path): the anchor the measured ratio is applied to.
QUIET_FORWARD_TOKENS_PER_S = 700


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def load_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model), args.model
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **SHAPES[args.shape])), f"random weights, {args.shape} shape"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "retro.json"))
    args = parser.parse_args()

    options = RetroOptions()
    m, k, r = options.chunk_size, options.k, options.neighbour_tokens
    model, label = load_model(args)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    torch.manual_seed(0)
    modules = build_modules(model.config, options)
    for block in modules.cca:  # an opened gate: the trained state, so nothing is skipped
        torch.nn.init.normal_(block.attn.o.weight, std=0.02)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(args.batch):
        ids = rng.integers(10, vocab, size=args.tokens).tolist()
        neighbours = {u: [rng.integers(10, vocab, size=r).tolist() for _ in range(k)] for u in range(args.tokens // m) if (u + 1) * m < args.tokens}
        seqs.append(RetroSequence(ids, 1, 0, neighbours))
    batch = collate(seqs, m, k, r, pad_id=0)
    labels = labels_of(batch, seqs)
    retro = RetroLM(model, modules)
    optimizer = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=1e-4)

    def base():  # outside `RetroLM.hidden` the hooks have no state and return the layer's output as is
        with torch.no_grad():
            model(input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device)).logits.float()

    def retro_forward():
        with torch.no_grad():
            retro.forward(batch)

    def train():
        modules.train()
        optimizer.zero_grad(set_to_none=True)
        _, loss = retro.forward(batch, labels)
        loss.backward()
        optimizer.step()
        modules.eval()

    components = {"base": base, "retro": retro_forward, "train": train}
    train()  # warm-up (allocations, kernels)
    base()
    seconds: dict[str, list[float]] = {name: [] for name in components}
    loads = [load_average()]
    for round_ in range(args.rounds):
        names = list(components)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            components[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
        loads.append(load_average())
    tokens = args.batch * args.tokens
    median = {name: statistics.median(values) for name, values in seconds.items()}
    train_rate = tokens / median["train"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": label, "device": device, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": {"min": min(loads), "max": max(loads)},
        "batch": {"sequences": args.batch, "tokens_each": args.tokens, "chunk_size": m, "k": k, "neighbour_tokens": r,
                  "cca_layers": modules.layers, "encoder_layers": options.encoder_layers},
        "trained_params": int(sum(p.numel() for p in modules.parameters())),
        "seconds_median": median,
        "tokens_per_second": {name: tokens / s for name, s in median.items()},
        "ratio_to_base_forward": {name: median["base"] / s for name, s in median.items()},
        "default_training_minutes_at_this_rate": DEFAULT_DECODER_TOKENS / train_rate / 60,
        "default_training_minutes_quiet_estimate": DEFAULT_DECODER_TOKENS / (QUIET_FORWARD_TOKENS_PER_S * median["base"] / median["train"]) / 60,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)
    print("| component | s / batch | tok/s | ratio to base forward |\n|---|---|---|---|")
    for name in components:
        print(f"| {name} | {median[name]:.3f} | {tokens / median[name]:.0f} | {median['base'] / median[name]:.2f} |")
    print(f"default training ({DEFAULT_DECODER_TOKENS} decoder tokens): {result['default_training_minutes_at_this_rate']:.1f} min at this "
          f"rate (load average {min(loads):.1f}-{max(loads):.1f}), {result['default_training_minutes_quiet_estimate']:.1f} min at the quiet "
          f"anchor ({QUIET_FORWARD_TOKENS_PER_S} tok/s forward x the measured ratio)")


if __name__ == "__main__":
    main()
