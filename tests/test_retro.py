"""RETRO-fitting: the zero-gate start equals the base LM, RETRO's causal shift, neighbours (continuation,
own-article exclusion, content cache) on a hand-built index, the training-data guard, kill/resume
equality, the base-LM fingerprint check, and train + evaluate through the stages with the
random-neighbour control — on the tiny LM and the smoke workspace."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.architectures.retro import (
    NeighbourSource,
    RetroLM,
    RetroOptions,
    RetroSequence,
    auto_cca_layers,
    build_modules,
    collate,
    continuation_texts,
    score_sequences,
)
from ragops.errors import RagopsError

M, K, R = 4, 2, 5  # chunk size, neighbours, neighbour tokens of the module-level tests


@pytest.fixture(scope="module")
def tiny_model(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)).eval()


def _modules(model, layers=(0, 1), seed=0, gate_open=False):
    torch.manual_seed(seed)
    options = RetroOptions(chunk_size=M, k=K, neighbour_tokens=R, cca_layers=list(layers), encoder_layers=1, encoder_ffn=16)
    modules = build_modules(model.config, options).eval()
    if gate_open:  # what training does to the zero-initialised output projections
        for block in modules.cca:
            torch.nn.init.normal_(block.attn.o.weight, std=0.5)
    return modules


def _sequence(length=16, seed=1, neighbours=None):
    rng = np.random.default_rng(seed)
    return RetroSequence(rng.integers(5, 500, size=length).tolist(), 1, 0, neighbours or {})


def _neighbours(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 500, size=R).tolist() for _ in range(K)]


def _all_logprobs(model, modules, seq):
    retro = RetroLM(model, modules)
    try:
        return score_sequences(retro, [seq], M, K, R, pad_id=0)[0]
    finally:
        retro.remove()


def test_auto_layers_are_in_the_upper_half():
    assert auto_cca_layers(30) == [15, 22, 29]  # SmolLM2
    assert auto_cca_layers(2) == [1]  # the tiny test LM
    assert auto_cca_layers(12) == [6, 8, 11]


def test_before_training_logits_equal_the_base_lm_exactly(tiny_model):
    """Zero-initialised CCA output projections: the retro-fitted forward is the base LM's, bit for
    bit, even with neighbours attached to every chunk."""
    seqs = [_sequence(16, 1, {u: _neighbours(10 + u) for u in range(4)}), _sequence(11, 2, {0: _neighbours(3), 1: _neighbours(4)})]
    batch = collate(seqs, M, K, R, pad_id=0)
    retro = RetroLM(tiny_model, _modules(tiny_model))
    try:
        with torch.no_grad():
            logits, _ = retro.forward(batch)
            base = tiny_model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions).logits
        assert torch.equal(logits, base.float())
        assert batch.where.shape[0] == 6  # the neighbours were really there
    finally:
        retro.remove()
    # and the scored log-probs equal an independent log-softmax of the plain model's logits
    seq = seqs[0]
    with torch.no_grad():
        plain = torch.log_softmax(tiny_model(input_ids=torch.tensor([seq.ids])).logits[0].float(), dim=-1)
    expected = plain[:-1].gather(1, torch.tensor(seq.ids[1:])[:, None]).squeeze(1).numpy()
    np.testing.assert_allclose(_all_logprobs(tiny_model, _modules(tiny_model), seq), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_neighbours_of_a_chunk_never_change_tokens_up_to_its_last_token(tiny_model, chunk):
    """RETRO's m−1 shift: chunk u's neighbours are read from its last token (position (u+1)m−1)
    onward, so the log-prob of every token at or before (u+1)m−1 is unchanged when they change,
    and the next token's is changed (gate open, CCA in both layers of the tiny LM)."""
    modules = _modules(tiny_model, gate_open=True)
    base = {u: _neighbours(20 + u) for u in range(4)}
    other = {**base, chunk: _neighbours(99)}
    a = _all_logprobs(tiny_model, modules, _sequence(16, 1, base))
    b = _all_logprobs(tiny_model, modules, _sequence(16, 1, other))
    last = (chunk + 1) * M - 1  # position of chunk u's last token; token j's log-prob is a[j − 1]
    np.testing.assert_array_equal(a[:last], b[:last])
    assert abs(a[last] - b[last]) > 1e-6  # token (u+1)m, predicted at the last token of chunk u
    # a neighbour-free chunk grid: without neighbours the open-gate model is the base model
    plain = _all_logprobs(tiny_model, modules, _sequence(16, 1, {}))
    np.testing.assert_array_equal(plain[:M - 1], a[:M - 1])  # before any chunk's last token nothing can differ


def test_left_padded_prompt_keeps_the_grid_and_the_base_log_probs(tiny_model):
    """A QA prompt left-padded to a multiple of m, batched with a longer one: scores equal the
    unpadded plain model's (gate closed) and the question's neighbours sit on its last chunk."""
    from ragops.architectures.retro import qa_sequence

    prompt, answer = list(range(40, 46)), [7, 8, 9]
    seq = qa_sequence(prompt, answer, M, _neighbours(5))
    assert seq.lead == 2 and list(seq.neighbours) == [1]  # 2 pads + 6 prompt tokens = chunks 0, 1
    prompts = collate([qa_sequence(prompt, [], M, _neighbours(5)), qa_sequence(list(range(50, 63)), [], M, _neighbours(6))],
                      M, K, R, pad_id=0, align_end=True)
    assert prompts.starts[0] + len(prompt) == prompts.starts[1] + 13 == prompts.ids.shape[1] == 16  # both prompts end together
    assert prompts.where.tolist() == [[0, 3], [1, 3]]  # ... and their neighbours sit on the last chunk
    with torch.no_grad():
        plain = torch.log_softmax(tiny_model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
    expected = plain[len(prompt) - 1 : -1].gather(1, torch.tensor(answer)[:, None]).squeeze(1).numpy()
    retro = RetroLM(tiny_model, _modules(tiny_model))
    try:
        got = score_sequences(retro, [seq, qa_sequence(list(range(50, 63)), [4], M, _neighbours(6))], M, K, R, pad_id=0)[0]
    finally:
        retro.remove()
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- neighbours on a hand-built index ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_index(tmp_path_factory):
    """Three articles: A (2 chunks), B (2 chunks), C (1 chunk), embedded with a tiny encoder."""
    from ragops.retrieval.embed import Encoder
    from ragops.retrieval.retriever import DenseRetriever
    from tests.builders import build_tiny_encoder

    encoder = Encoder.load(str(build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-encoder")), device="cpu")
    chunks = pd.DataFrame({
        "chunk_id": ["A#0000", "A#0001", "B#0000", "B#0001", "C#0000"],
        "doc_id": ["A", "A", "B", "B", "C"],
        "position": [0, 1, 0, 1, 0],
        "title": ["Alpha", "Alpha", "Beta", "Beta", "Gamma"],
        "text": ["rivers flow north", "into the cold sea", "bridges span bays", "built of old stone", "painters of planets"],
    })
    from ragops.retrieval.retriever import ChunkTable

    vectors = encoder.encode(ChunkTable(chunks).texts, progress=False)
    return DenseRetriever.from_vectors(encoder, vectors, chunks), chunks


def test_neighbours_are_chunk_plus_continuation_and_never_the_own_article(hand_index, tiny_lm_dir, tmp_path):
    from ragops.architectures.shared import RetrievalCache
    from ragops.lm.model import CausalLM

    retriever, chunks = hand_index
    lm = CausalLM.load(tiny_lm_dir, device="cpu")
    assert continuation_texts(chunks) == {"A#0000": "into the cold sea", "B#0000": "built of old stone"}
    cache = RetrievalCache(tmp_path / "n.json", {"test": 1})
    source = NeighbourSource(retriever, continuation_texts(chunks), lm.encode, k=2, tokens=1000, cache=cache)
    own = source.passages(["Alpha\nrivers flow north"], [None])[0]
    assert own[0].chunk_id == "A#0000"  # the identical text is its own nearest neighbour ...
    found, passages = source.neighbours(["Alpha\nrivers flow north"] * 2, ["A", "B"])
    assert all(p.doc_id != "A" for p in passages[0]) and all(p.doc_id != "B" for p in passages[1])  # ... unless excluded
    expected = {"A#0000": "Alpha\nrivers flow north\ninto the cold sea", "A#0001": "Alpha\ninto the cold sea",
                "B#0000": "Beta\nbridges span bays\nbuilt of old stone", "B#0001": "Beta\nbuilt of old stone",
                "C#0000": "Gamma\npainters of planets"}
    for ids, hits in zip(found, passages, strict=True):
        assert len(hits) == 2
        assert [lm.decode(n) for n in ids] == [expected[p.chunk_id] for p in hits]
    short = NeighbourSource(retriever, continuation_texts(chunks), lm.encode, k=2, tokens=3)
    assert all(len(n) == 3 for n in short.neighbours(["Beta\nbridges"], ["A"])[0][0])  # cut to r tokens
    # cached by content: the same query and exclusion is answered from the cache, a new one is not
    searches = retriever.calls
    source.neighbours(["Alpha\nrivers flow north"], ["A"])
    assert retriever.calls == searches
    source.neighbours(["Gamma painters"], ["C"])
    assert retriever.calls == searches + 1
    # the random control: k chunks drawn from the query's content, never the own article
    rand = NeighbourSource(retriever, continuation_texts(chunks), lm.encode, k=2, tokens=1000, mode="random", seed=3)
    first = rand.passages(["x", "x", "y"], ["A", "A", "C"])
    assert [p.chunk_id for p in first[0]] == [p.chunk_id for p in first[1]]
    assert all(p.doc_id != "A" for p in first[0]) and all(p.doc_id != "C" for p in first[2])
    assert retriever.calls == searches + 1 and rand.calls == 0


def test_lm_sequence_queries_each_chunk_with_its_own_text():
    from ragops.architectures.retro import lm_sequence

    class Recording:
        def __init__(self):
            self.asked = []

        def neighbours(self, queries, exclude):
            self.asked.append((list(queries), list(exclude)))
            return [[[1, 2]] for _ in queries], [[] for _ in queries]

    source = Recording()
    ids = list(range(10, 21))  # 11 tokens, m = 4: chunks 0, 1 can affect a later token; chunk 2 (8..10) cannot
    seq, _ = lm_sequence(ids, 1, 4, source, decode=lambda t: ",".join(map(str, t)), exclude="D")
    assert source.asked == [(["10,11,12,13", "14,15,16,17"], ["D", "D"])]
    assert sorted(seq.neighbours) == [0, 1]


# --- the architecture on the smoke workspace --------------------------------------------------------


def _retro(root, name="retro", **overrides):
    from ragops.evaluation.runner import build_architecture
    from ragops.params import load_config
    from ragops.paths import Workspace

    ws = Workspace(root)
    config = load_config(ws.params)
    options = RetroOptions.model_validate({**config.architectures[name].model_dump(), **overrides})
    return build_architecture(name, ws, config, progress=False, options=options)


def test_training_data_is_train_split_only_and_guarded(smoke_workspace, monkeypatch):
    from ragops.training.data import forbidden_doc_ids

    arch = _retro(smoke_workspace, cache_retrieval=False)  # the shared workspace stays as it is
    ws = arch.ctx.ws
    train, dev, ids = arch.training_sequences(arch.neighbour_source("retrieved"))
    questions = pd.read_parquet(ws.questions)
    split_of = dict(zip(questions["qid"].astype(str), questions["split"], strict=True))
    qa = [e.split(":", 1)[1] for e in ids["train"] + ids["dev"] if e.startswith("qa:")]
    docs = [e.split(":", 1)[1] for e in ids["train"] + ids["dev"] if e.startswith("lm:")]
    assert len(qa) == 6 and {split_of[q] for q in qa} == {"train"}
    assert len(docs) == 4 and not set(docs) & forbidden_doc_ids(ws)
    for seq in train + dev:
        for found in seq.neighbours.values():
            assert len(found) == 2
    assert not set(ids["train"]) & set(ids["dev"]) and len(dev) == 1
    # the guard: held-out articles handed in as training text are refused
    monkeypatch.setattr("ragops.architectures.retro.trainable_articles", lambda _ws: pd.read_parquet(ws.heldout))
    with pytest.raises(RagopsError, match="leakage: training text from"):
        arch.training_sequences(arch.neighbour_source("retrieved"))


class _Killed(Exception):
    """Stands for kill -9 between two optimizer steps."""


def test_kill_and_resume_equals_an_uninterrupted_run_and_only_new_modules_train(copy_workspace, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from ragops.architectures.retro import RetroTask
    from ragops.cost import CostMeter
    from ragops.training.loop import TrainRun

    root = copy_workspace()
    overrides = {"train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup": 0.0, "checkpoint_every": 1}}
    arch = _retro(root, **overrides)
    base_before = {k: v.clone() for k, v in arch.lm.model.state_dict().items()}
    with CostMeter("train") as meter:
        info = arch.train(TrainRun(meter=meter, progress=False))
    assert info["training"]["steps"] == 3 and meter.counters["optimizer_steps"] == 3
    assert meter.counters["tokens_trained"] > 0 and meter.counters["flops"] > 0 and meter.counters["retrieval_calls"] > 0
    assert all(torch.equal(v, base_before[k]) for k, v in arch.lm.model.state_dict().items())  # the LM stays frozen
    weights = load_file(str(arch.artifact_dir / "retro" / "modules.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if k.endswith("attn.o.weight"))  # the gate opened
    assert info["trainable_params"] == sum(v.numel() for v in weights.values())

    checkpoint, settings = tmp_path / "retro.ckpt", arch.training_settings()
    micro_batch = RetroTask.micro_batch

    def killed_at_step_2(self, step, micro):
        if step == 2:
            raise _Killed
        return micro_batch(self, step, micro)

    monkeypatch.setattr(RetroTask, "micro_batch", killed_at_step_2)
    with pytest.raises(_Killed):
        _retro(root, **overrides).train(TrainRun(checkpoint=checkpoint, settings=settings, progress=False))
    monkeypatch.setattr(RetroTask, "micro_batch", micro_batch)
    resumed = _retro(root, **overrides).train(TrainRun(checkpoint=checkpoint, settings=settings, progress=False))
    assert resumed["training"]["resumed_from"] == 2 and resumed["training"]["steps"] == 3
    again = load_file(str(arch.artifact_dir / "retro" / "modules.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)

    # after training the neighbours matter, and still only from the last token of their chunk on
    trained = _retro(root, **overrides)
    retro, m = trained.retro_lm(), trained.options.chunk_size
    ids = list(range(20, 20 + 3 * m))
    runs = [score_sequences(retro, [RetroSequence(ids, 1, 0, {0: [[5 + s] * 16, [9 + s] * 16]})], m, 2, 16, 0)[0] for s in (0, 100)]
    np.testing.assert_array_equal(runs[0][: m - 1], runs[1][: m - 1])
    assert np.abs(runs[0][m - 1 :] - runs[1][m - 1 :]).max() > 1e-6

    # modules trained on another base LM are refused, naming both
    meta = arch.artifact_dir / "retro" / "retro.json"
    meta.write_text(meta.read_text().replace('"base_fingerprint": "', '"base_fingerprint": "other'))
    with pytest.raises(RagopsError, match=r"trained on base LM .*fingerprint other.*not on .*retrain it"):
        _retro(root, **overrides).retro_lm()


def test_train_and_evaluate_smoke_with_the_random_neighbour_control(copy_workspace):
    """`ragops train` + `ragops evaluate` for retro and retro_random: the control reuses retro's
    trained modules and reads random chunks; both report every task's usual metric keys."""
    from ragops import stages
    from ragops.io import read_json
    from ragops.params import load_config
    from ragops.paths import Workspace

    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    for name in ("retro", "retro_random"):
        stages.train_architecture(ws, config, name, progress=False)
        stages.evaluate_architecture(ws, config, name, progress=False)
    retro = read_json(ws.architecture_dir("retro") / "manifest.json")["info"]
    control = read_json(ws.architecture_dir("retro_random") / "manifest.json")["info"]
    assert retro["training"]["steps"] == 2 and control["reused_from"] == "retro"
    assert (ws.architecture_dir("retro_random") / "retro" / "modules.safetensors").read_bytes() == \
        (ws.architecture_dir("retro") / "retro" / "modules.safetensors").read_bytes()
    keys = set(read_json(ws.metrics_file("closed_book")).keys()) if ws.metrics_file("closed_book").exists() else set()
    for name in ("retro", "retro_random"):
        metrics = read_json(ws.metrics_file(name))
        assert {"describe/f1", "identify/f1", "describe/gold_nll", "lm/token_ppl", "train/optimizer_steps"} <= set(metrics), name
        assert not keys or keys - {k for k in keys if k.startswith(("train/", "inference/"))} <= set(metrics)
        predictions = pd.read_parquet(ws.eval_dir(name) / "predictions.parquet")
        qa = predictions[predictions["task"] != "lm"]
        assert qa["retrieved_doc_ids"].map(len).eq(2).all()
    retrieved = pd.read_parquet(ws.eval_dir("retro") / "predictions.parquet")
    randomised = pd.read_parquet(ws.eval_dir("retro_random") / "predictions.parquet")
    qa_r, qa_c = retrieved[retrieved["task"] != "lm"], randomised[randomised["task"] != "lm"]
    assert list(qa_r["retrieved_doc_ids"].map(list)) != list(qa_c["retrieved_doc_ids"].map(list))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_untrained_retro_scores_and_answers_as_the_closed_book(smoke_workspace, precision):
    """Before training (no artifacts: fresh modules, gate closed) retro's lm NLLs, gold-answer NLLs
    and greedy answers are the closed book's, although every chunk and question has neighbours —
    also under bf16 autocast (lm.precision), which RETRO's own forward must follow."""
    from ragops.cost import CostMeter
    from ragops.evaluation.data import load_heldout, load_questions
    from ragops.evaluation.runner import build_architecture

    arch = _retro(smoke_workspace, cache_retrieval=False)  # the shared workspace stays as it is
    ws, config = arch.ctx.ws, arch.ctx.config
    closed = build_architecture("closed_book", ws, config, progress=False, lm=arch.lm)
    docs = load_heldout(ws, config.eval.split, 2)
    questions = load_questions(ws, ["describe", "identify"], config.eval.split, 2)
    previous, arch.lm.precision = arch.lm.precision, precision
    try:
        with CostMeter("inference") as meter:
            ours, theirs = arch.score_documents(docs, meter), closed.score_documents(docs, CostMeter("inference"))
            answers, reference = arch.answer(questions, meter), closed.answer(questions, CostMeter("inference"))
        if precision == "bfloat16":  # RETRO's own forward really ran under autocast, not in float32
            arch.lm.precision = "float32"
            in_float32 = arch.score_documents(docs, CostMeter("inference"))
            assert not np.allclose(ours["nll_sum"], in_float32["nll_sum"], rtol=1e-6, atol=0)
    finally:
        arch.lm.precision = previous
    tolerance = 1e-5 if precision == "float32" else 2e-2  # bf16 rounding differs with batch shapes
    np.testing.assert_allclose(ours["nll_sum"], theirs["nll_sum"], rtol=tolerance)
    assert list(ours["n_tokens"]) == list(theirs["n_tokens"])
    assert (ours["retrieval_calls"] > 0).all() and (ours["tokens_retrieved"] > 0).all()
    np.testing.assert_allclose(answers["gold_nll"], reference["gold_nll"], rtol=tolerance)
    if precision == "float32":
        assert list(answers["prediction"]) == list(reference["prediction"])
    assert answers["retrieved_doc_ids"].map(len).eq(2).all()
    assert meter.counters["retrieval_calls"] == ours["retrieval_calls"].sum() + len(questions)


def test_cached_greedy_generation_equals_full_recomputation(tiny_model, tiny_lm_dir):
    """Generation appends one token at a time with the KV cache and the question's neighbours kept:
    with the gate open, each step's token is the argmax of a full forward over prompt + tokens so far."""
    from ragops.architectures.retro import greedy_generate, qa_sequence
    from ragops.lm.model import CausalLM

    lm = CausalLM.load(tiny_lm_dir, device="cpu")
    modules = _modules(tiny_model, gate_open=True)
    prompts = [qa_sequence(list(range(40, 46)), [], M, _neighbours(5)), qa_sequence(list(range(50, 63)), [], M, _neighbours(6))]
    retro = RetroLM(tiny_model, modules)
    try:
        texts, counts = greedy_generate(retro, lm, prompts, M, K, R, max_new_tokens=7, stop=())
        for prompt, text, count in zip(prompts, texts, counts, strict=True):
            tokens: list[int] = []
            for _ in range(count):
                seq = RetroSequence(prompt.ids + tokens, 1, prompt.lead, prompt.neighbours)
                with torch.no_grad():
                    logits, _ = retro.forward(collate([seq], M, K, R, pad_id=lm.pad_id))
                tokens.append(int(logits[0, -1].argmax()))
            assert count > M  # past the question chunk's m-token reach: later tokens read no neighbours
            assert text == lm.decode(tokens)
    finally:
        retro.remove()


def test_the_control_trains_its_own_weights_when_retro_has_none(copy_workspace):
    from ragops.training.loop import TrainRun

    control = _retro(copy_workspace(), "retro_random")
    info = control.train(TrainRun(progress=False))
    assert "reused_from" not in info and info["training"]["steps"] == 2
    assert (control.artifact_dir / "retro" / "modules.safetensors").exists() and not control.needs_training()
