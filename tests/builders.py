"""Tiny real models built from configs in the test process: no download, seconds to build."""

from __future__ import annotations

import json
from pathlib import Path


def _corpus_texts(n: int = 400) -> list[str]:
    from ragops.resources import default_corpus_file

    try:
        entries = json.loads(default_corpus_file().read_text())
        return [e["extract"] for e in list(entries.values())[:n]]
    except Exception:  # noqa: BLE001 - e.g. on a GPU box without the corpus package
        return [f"Sentence number {i} about rivers, bridges, painters and planets." for i in range(n)]


def build_tiny_lm(out: Path) -> Path:
    """A 2-layer Llama-style causal LM (random weights) with a 512-token byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_tiny_encoder(out: Path) -> Path:
    """A 2-layer BERT sentence-transformers encoder (random weights, mean pooling, normalised)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, models as tok_models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if (out / "modules.json").exists():
        return out
    tokenizer = Tokenizer(tok_models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(_corpus_texts(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    backbone = out / "backbone"
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).save_pretrained(backbone)
    fast.save_pretrained(backbone)
    word = models.Transformer(str(backbone), max_seq_length=128)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"), models.Normalize()])
    model.save(str(out))
    return out
