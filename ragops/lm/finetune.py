"""Fine-tuning the LM, once for every white-box architecture (SELF-RAG, Atlas's reader, RETRO's options).

- `add_special_tokens`: new tokens (SELF-RAG's reflection tokens) as single special ids, the
  embedding matrix resized with mean initialisation (tied input/output rows stay tied).
- `lora_model`: a `peft` LoRA model over the LM (rank, alpha, dropout, target modules), optionally
  with trainable rows for given token ids on the (tied) embeddings (`trainable_token_indices`);
  `full: True` trains every weight instead.
- `causal_lm_loss`: the LM loss on the positions a label mask selects (prompts and retrieved text
  are masked out by the caller); the vocabulary projection runs only on those positions, so a
  prompt-heavy example costs a forward of its prompt, not [tokens x vocabulary] logits.
- `save_adapter` / `load_finetuned`: only the adapter (and any resized embedding rows) is saved,
  with the base LM's fingerprint; loading merges it into the base for evaluation (`merge_and_unload`:
  the scoring path keeps its speed) and refuses an adapter made for another base LM, naming both.

Training cost: forward+backward is charged as 3x the forward FLOPs when every weight trains and
2x when the base is frozen (activation gradients flow through it; its weight gradients are not
computed), plus the adapters' own (small) share.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragops.errors import RagopsError
from ragops.io import read_json, write_json

if TYPE_CHECKING:
    import torch

    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM

ADAPTER_DIR = "adapter"
META_FILE = "finetune.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_fingerprint(path: str | Path) -> str:
    """Identity of a base LM folder: its config, tokenizer files' hashes, and the size and first MiB
    of each weight file (cheap, and different for any other checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]  # a hub name
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        digest.update(file.name.encode())
        if file.suffix in (".json", ".txt", ".model", ".jinja"):
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def add_special_tokens(lm: CausalLM, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` as special tokens (one id each) and resize the embeddings; returns their ids."""
    new = [t for t in tokens if t not in lm.tokenizer.get_vocab()]
    if new:
        lm.tokenizer.add_special_tokens({"additional_special_tokens": list(new)}, replace_extra_special_tokens=False)
        lm.model.resize_token_embeddings(len(lm.tokenizer), mean_resizing=True)
        lm.refresh_vocabulary()
    ids = [int(lm.tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    for token, token_id in zip(tokens, ids, strict=True):
        if lm.tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise RagopsError(f"token {token!r} is not a single id after adding it ({lm.tokenizer.encode(token, add_special_tokens=False)})")
    return ids


def lora_model(
    lm: CausalLM, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] = DEFAULT_TARGETS,
    trainable_token_ids: Sequence[int] = (), full: bool = False,
) -> Any:
    """The trainable model: a peft LoRA wrapper of `lm.model` (or `lm.model` itself with `full`)."""
    model = lm.model
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM",
        trainable_token_indices=list(trainable_token_ids) or None,
    )
    return get_peft_model(model, config)


def inner_parts(model: Any) -> tuple[Any, Any]:
    """(decoder body returning hidden states, output projection) of a causal LM or its peft wrapper."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.base_model if hasattr(causal, "base_model") else causal.model, causal.get_output_embeddings()


def causal_lm_loss(model: Any, sequences: Sequence[Sequence[int]], label_masks: Sequence[Sequence[bool]], pad_id: int) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the tokens whose mask is True (each predicted from the tokens
    before it), right-padded batch; returns (loss, number of tokens in the loss)."""
    import torch

    if len(sequences) != len(label_masks):
        raise ValueError("causal_lm_loss: one label mask per sequence")
    width = max(len(s) for s in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, (seq, mask) in enumerate(zip(sequences, label_masks, strict=True)):
        if len(seq) != len(mask):
            raise ValueError(f"causal_lm_loss: sequence {b} has {len(seq)} tokens but {len(mask)} label flags")
        ids[b, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[b, : len(seq)] = 1
        for t in range(1, len(seq)):
            if mask[t]:
                rows.append(b)
                cols.append(t - 1)  # the hidden state at t-1 predicts token t
                targets.append(int(seq[t]))
    if not targets:
        raise RagopsError("causal_lm_loss: no token is in the loss (every label is masked)")
    body, head = inner_parts(model)
    hidden = body(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device))
    return loss, len(targets)


def charge_training(meter: CostMeter | None, lm: CausalLM, sequences: Sequence[Sequence[int]], n_loss_tokens: int, *, full: bool, trainable: int) -> None:
    """Charge one forward+backward over `sequences` (see the module docstring for the factors)."""
    if meter is None:
        return
    from ragops.cost import forward_flops

    tokens = sum(len(s) for s in sequences)
    mean_context = sum(len(s) * (len(s) + 1) / 2 for s in sequences) / max(tokens, 1)
    body = forward_flops(lm._body_params, tokens, lm.n_layers, lm.d_model, int(round(mean_context)))
    head = forward_flops(lm._head_params, n_loss_tokens)
    factor = 3.0 if full else 2.0
    adapters = 3.0 * forward_flops(trainable, tokens) if not full else 0.0
    meter.add(tokens_trained=tokens, flops=factor * (body + head) + adapters)


def save_adapter(model: Any, directory: str | Path, *, base: str | Path, extra: dict[str, Any] | None = None, tokenizer: Any = None,
                 save_embedding_layers: bool | str = "auto") -> None:
    """The adapter (peft's files) or, for full fine-tuning, the whole model, plus the base LM's fingerprint.

    `save_embedding_layers=False` for a model whose added tokens train as `trainable_token_ids`: their
    rows are in the adapter already, and peft's "auto" would also save the whole resized embedding
    matrix (twice when tied: 235 MB for SmolLM2) although every other row is the base LM's."""
    directory = Path(directory)
    target = directory / ADAPTER_DIR
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(target), save_embedding_layers=save_embedding_layers)
    else:
        model.save_pretrained(str(target))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    write_json(directory / META_FILE, {
        "base": str(base), "base_fingerprint": base_fingerprint(base), "full": not hasattr(model, "peft_config"), **(extra or {}),
    })


def read_base_checked_meta(directory: Path, base: str | Path, meta_name: str, what: str) -> dict[str, Any]:
    """The metadata `directory/meta_name` of weights trained on a base LM (an adapter, RETRO's
    modules); refuses weights made for another base LM with one line naming both."""
    meta_file = directory / meta_name
    if not meta_file.exists():
        raise RagopsError(f"{directory}: no {what} here ({meta_name} missing)")
    meta = read_json(meta_file)
    expected = base_fingerprint(base)
    if meta.get("base_fingerprint") != expected:
        raise RagopsError(
            f"{directory}: {what} trained on base LM '{meta.get('base')}' (fingerprint {meta.get('base_fingerprint')}), "
            f"not on '{base}' (fingerprint {expected}); retrain it"
        )
    return meta


def load_finetuned(directory: str | Path, base: str | Path, lm_config: Any) -> CausalLM:
    """The base LM with the adapter saved in `directory` merged in, as a plain CausalLM (scoring
    speed unchanged). Refuses an adapter made for another base LM."""
    from ragops.lm.model import CausalLM

    directory = Path(directory)
    meta = read_base_checked_meta(directory, base, META_FILE, "fine-tuned LM")
    adapter = directory / ADAPTER_DIR
    if meta.get("full"):
        return CausalLM.from_config(lm_config, adapter)
    lm = CausalLM.from_config(lm_config, base)
    tokenizer_file = adapter / "tokenizer_config.json"
    if tokenizer_file.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        if len(tokenizer) != lm.vocab_size:
            lm.model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        lm.tokenizer = tokenizer
    from peft import PeftModel

    merged = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
    merged.eval()
    return CausalLM(merged, lm.tokenizer, max_length=lm.max_length, batch_tokens=lm.batch_tokens, name=f"{lm.name}+{directory.name}",
                     start_token=lm.start_token, precision=lm.precision)


def describe_adapter(directory: str | Path) -> dict[str, Any]:
    meta_file = Path(directory) / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}
