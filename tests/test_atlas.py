"""Atlas: the retriever losses against hand computations, the joint training task (every loss mode
and Atlas alias), the refresh schedule, query-side training, checkpoint resume, leakage, and a
train + evaluate smoke run — on tiny tensors, the tiny LM and the smoke workspace."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.architectures.atlas import (
    LOSS_ALIASES,
    AtlasOptions,
    adist_scores,
    emdr_loss,
    loop_loss,
    pdist_loss,
    retriever_loss,
)
from ragops.errors import ConfigError


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# --- the losses on tiny tensors ---------------------------------------------------------------------


def test_pdist_is_kl_from_the_reader_likelihood_target_to_the_retriever():
    scores = torch.tensor([[0.9, 0.5, 0.1]], requires_grad=True)
    gold = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    p_r = _softmax([0.9 / 0.5, 0.5 / 0.5, 0.1 / 0.5])
    p_t = _softmax([-1.0 / 2.0, -2.0 / 2.0, -3.0 / 2.0])
    loss = pdist_loss(scores, gold, temperature_score=0.5, temperature_gold=2.0)
    assert loss.item() == pytest.approx(_kl(p_t, p_r), abs=1e-6)  # KL(P_T || P_R), Atlas's direction
    reverse = pdist_loss(scores, gold, temperature_score=0.5, temperature_gold=2.0, direction="student_teacher")
    assert reverse.item() == pytest.approx(_kl(p_r, p_t), abs=1e-6)
    mean = pdist_loss(scores, gold, temperature_score=0.5, temperature_gold=2.0, reduction="mean")
    assert mean.item() == pytest.approx(_kl(p_t, p_r) / 3, abs=1e-6)  # Atlas's KLDivLoss() default
    loss.backward()
    assert scores.grad is not None and float(scores.grad.abs().sum()) > 0
    assert gold.grad is None  # no gradient into the reader from this term


def test_pdist_ignores_absent_passages():
    """A question with fewer than K passages: −inf marks the absent one; the KL is over the others."""
    scores = torch.tensor([[0.3, 0.1, float("-inf")]])
    gold = torch.tensor([[-0.5, -1.5, float("-inf")]])
    expected = _kl(_softmax([-0.5, -1.5]), _softmax([0.3 / 0.1, 0.1 / 0.1]))
    assert pdist_loss(scores, gold, temperature_score=0.1, temperature_gold=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_loop_target_favours_the_passage_whose_removal_hurts_most():
    scores = torch.tensor([[0.2, 0.4, 0.6]], requires_grad=True)
    nll_without = torch.tensor([[2.0, 0.5, 1.0]])  # removing passage 0 raises the NLL most
    p_t = _softmax([2.0, 0.5, 1.0])
    p_r = _softmax([0.2 / 0.1, 0.4 / 0.1, 0.6 / 0.1])
    loss = loop_loss(scores, nll_without, temperature_score=0.1, temperature_gold=1.0)
    assert loss.item() == pytest.approx(_kl(p_t, p_r), abs=1e-6)
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 2]  # descent raises passage 0's score, lowers passage 2's


def test_emdr_is_the_marginal_likelihood_over_passages_per_token():
    scores = torch.tensor([[1.0, 0.0], [0.5, float("-inf")]], requires_grad=True)
    # log p(y_t | d_k): question 0 has two answer tokens, question 1 one (and one absent passage)
    logprobs = torch.tensor([[[-0.1, -2.0], [-3.0, -0.2]], [[-0.7, 0.0], [-9.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    w = _softmax([1.0, 0.0])
    t0 = math.log(w[0] * math.exp(-0.1) + w[1] * math.exp(-3.0))
    t1 = math.log(w[0] * math.exp(-2.0) + w[1] * math.exp(-0.2))
    t2 = math.log(1.0 * math.exp(-0.7))  # only one passage present: P_R = 1
    expected = -(t0 + t1 + t2) / 3
    loss = emdr_loss(scores, logprobs, mask, temperature_score=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logprobs.grad is None  # the LM term is detached
    assert float(scores.grad[0].abs().sum()) > 0
    assert float(scores.grad[1, 0]) == pytest.approx(0.0, abs=1e-7)  # a single present passage: P_R fixed at 1


def test_adist_aggregation_weights_attention_by_value_norms():
    """Two layers, one head, two query positions, four keys; passages at keys [0, 2) and [2, 4)."""
    weights = np.array([
        [[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]],
        [[[0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.5, 0.0]]],
    ])
    norms = np.array([[[1.0, 2.0, 3.0, 4.0]], [[2.0, 2.0, 1.0, 1.0]]])
    # passage 0: layer 0 -> q0: .1*1+.2*2 = .5, q1: .4*1+.3*2 = 1.0; layer 1 -> q0: .25*2+.25*2 = 1.0, q1: .5*2 = 1.0
    # passage 1: layer 0 -> q0: .3*3+.4*4 = 2.5, q1: .2*3+.1*4 = 1.0; layer 1 -> q0: .25+.25 = .5, q1: .5*1 = .5
    expected = [(0.5 + 1.0 + 1.0 + 1.0) / 4, (2.5 + 1.0 + 0.5 + 0.5) / 4]
    assert adist_scores(weights, norms, [(0, 2), (2, 4)]) == pytest.approx(expected, abs=1e-12)


def test_every_mode_and_alias_dispatches_without_a_key_error():
    """Atlas's ADist mode looks up `normsum` where its aggregation writes `normssum`: here every
    mode and every alias of Atlas's `--gold_score_mode` reaches its loss."""
    options = AtlasOptions()
    scores = torch.tensor([[0.3, 0.2]], requires_grad=True)
    gold = {"loglik": np.array([[-1.0, -2.0]]), "nll_without": np.array([[1.0, 0.4]]), "attention": np.array([[0.2, 0.1]]),
            "token_logprobs": np.array([[[-1.0], [-2.0]]]), "token_mask": np.array([[1.0]])}
    for mode in ["pdist", "adist", "emdr", "loop", *LOSS_ALIASES]:
        value = retriever_loss(mode, scores, gold, options)
        assert torch.isfinite(value), mode
        assert AtlasOptions(retriever_loss=mode).retriever_loss == LOSS_ALIASES.get(mode, mode)
    assert retriever_loss("ppmean", scores, gold, options).item() == retriever_loss("pdist", scores, gold, options).item()
    assert retriever_loss("evalnormsum", scores, gold, options).item() == retriever_loss("adist", scores, gold, options).item()
    with pytest.raises(ValueError, match="unknown retriever loss"):
        retriever_loss("normsum", scores, gold, options)


def test_options_refuse_a_refresh_schedule_without_shared_towers():
    from ragops.params import resolve

    with pytest.raises(ConfigError, match=r"architectures.atlas.refresh_index': a refresh schedule needs towers: shared"):
        resolve({"architectures": {"atlas": {"refresh_index": "0-10:5"}}})
    with pytest.raises(ConfigError, match=r"architectures.atlas.refresh_index'.*expected 'start-end:every"):
        resolve({"architectures": {"atlas": {"towers": "shared", "refresh_index": "0-10"}}})
    with pytest.raises(ConfigError, match="architectures.atlas.retriever_loss"):
        resolve({"architectures": {"atlas": {"retriever_loss": "normsum"}}})


# --- the joint task on the smoke workspace (tiny LM, MiniLM) ----------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer, 32-dim sentence encoder: the dual encoder of the tests that train and re-embed
    the whole chunk table several times (MiniLM would take minutes on a loaded 2-core machine)."""
    from tests.builders import build_tiny_encoder

    return str(build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-encoder"))


def _atlas(root, encoder: str | None = None, **overrides):
    """The smoke workspace's atlas with option overrides; `encoder`: another dual encoder to train
    (the workspace vectors then do not match it and are recomputed with it first)."""
    from ragops.evaluation.runner import build_architecture
    from ragops.params import load_config
    from ragops.paths import Workspace

    ws = Workspace(root)
    config = load_config(ws.params)
    if encoder is not None:
        config = config.model_copy(update={"embed": config.embed.model_copy(update={"model": encoder})})
    options = AtlasOptions.model_validate({**config.architectures["atlas"].model_dump(), **overrides})
    return build_architecture("atlas", ws, config, progress=False, options=options)


def _weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.rglob("*.safetensors")):
        out.update({f"{file.relative_to(directory)}:{k}": v for k, v in load_file(str(file)).items()})
    assert out, f"no weights under {directory}"
    return out


def test_every_loss_mode_trains_reader_and_retriever_in_one_step(smoke_workspace, tiny_encoder):
    """One micro-batch per mode: the reader reads the K passages concatenated in the shared
    prompt; the loss reaches the LoRA reader and the query tower; the gold signal has one value per passage."""
    from ragops.architectures.atlas import AtlasTask
    from ragops.architectures.prompts import qa_prompt
    from ragops.cost import CostMeter
    from ragops.lm.finetune import lora_model
    from ragops.training.loop import TrainRun
    from ragops.training.retriever import RetrieverSetup, retrieval_examples

    base = _atlas(smoke_workspace, tiny_encoder)
    ws, config, lm = base.ctx.ws, base.ctx.config, base.ctx.lm
    train, dev = retrieval_examples(ws, qa_per_task=4, lm_windows=0, encode=lm.encode, decode=lm.decode, prefix_tokens=1,
                                    target_tokens=1, seed=config.seed, dev_fraction=0.1)
    setup = RetrieverSetup(ws, config, "query_side", meter=None, device="cpu")
    model = lora_model(lm, r=4, alpha=8)
    query_params = list(setup.retriever.query_model.parameters())
    lora_params = [p for p in model.parameters() if p.requires_grad]
    # Atlas's aliases become these names when the options are validated (test above)
    for mode in ["pdist", "adist", "emdr", "loop"]:
        arch = type(base)(base.ctx, base.options.model_copy(update={"retriever_loss": mode}))
        task = AtlasTask(arch, lm, model, setup, train, dev, TrainRun(meter=CostMeter("train"), progress=False))
        batch = task.micro_batch(0, 0)
        assert all(len(rows) == 2 for rows in batch["rows"])  # K = 2 in the smoke profile
        example, texts = batch["examples"][0], batch["texts"][0]
        assert lm.decode(batch["prompts"][0]) == lm.decode(lm.encode(qa_prompt(example.question, texts, None)))
        assert [setup.table.texts[r] for r in batch["rows"][0]] == texts  # whole passages, best first
        gold = task.gold_signals(batch)
        signal = next(v for key, v in gold.items() if key in ("loglik", "nll_without", "attention", "token_logprobs"))
        assert signal.shape[:2] == (len(batch["examples"]), 2) and np.isfinite(signal).all()
        loss, metrics = task.loss(batch)
        loss.backward()
        assert math.isfinite(loss.item()) and "train/retriever_loss" in metrics, mode
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in query_params), mode
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_params), mode
        for p in [*query_params, *lora_params]:
            p.grad = None


def test_adist_spans_are_the_passages_in_the_reader_prompt(smoke_workspace):
    from ragops.architectures.atlas import reader_passage_spans
    from ragops.architectures.prompts import qa_prompt

    lm = _atlas(smoke_workspace).ctx.lm
    texts = ["Alpha river\nflows north.", "Beta bridge\nspans the bay.", "Gamma\npainter of planets."]
    ids, spans = reader_passage_spans(lm, "Which river?", texts)
    assert ids == lm.encode(qa_prompt("Which river?", texts, lm.chat_formatter))  # the ids the reader is trained on
    assert [lm.decode(ids[a:b]).strip() for a, b in spans] == texts  # in the given (best-first) order
    assert spans[0][0] > spans[1][0] > spans[2][0]  # laid out best last, nearest the question


class _Killed(Exception):
    """Stands for kill -9 between two optimizer steps: nothing after the last checkpoint survives."""


def test_refresh_schedule_and_resume_equal_an_uninterrupted_run(copy_workspace, tiny_encoder, monkeypatch, tmp_path):
    """Shared towers with Atlas's schedule "1-2:1,3-10:2" over 4 steps: the index is re-embedded
    after steps 1 and 3 exactly. A run killed after its step-2 checkpoint and re-run resumes (index
    version 1 restored, the step-3 refresh redone) and ends with the same weights and index."""
    from ragops.architectures.atlas import AtlasTask
    from ragops.cost import CostMeter
    from ragops.training.loop import TrainRun
    from ragops.training.refresh import IndexRefresher

    root = copy_workspace()
    overrides = {"towers": "shared", "refresh_index": "1-2:1,3-10:2",
                 "train": {"steps": 4, "batch_size": 2, "lr": 2e-4, "warmup": 0.1, "checkpoint_every": 1}}
    started: list[int] = []
    start = IndexRefresher.start

    def recording_start(self, step, snapshot):
        started.append(step)
        return start(self, step, snapshot)

    monkeypatch.setattr(IndexRefresher, "start", recording_start)
    arch = _atlas(root, tiny_encoder, **overrides)
    with CostMeter("train") as meter:
        info = arch.train(TrainRun(meter=meter, progress=False))
    assert started == [1, 3]
    assert info["refresh"]["index_refreshes"] == 2 and info["refresh"]["index_version"] == 2
    assert meter.counters["index_refreshes"] == 3  # two scheduled refreshes + the final index
    assert meter.counters["optimizer_steps"] == 4
    out = arch.artifact_dir
    uninterrupted = {**_weights(out / "reader"), **_weights(out / "retriever")}
    index_bytes = (out / "retriever" / "index" / "dense.faiss").read_bytes()

    checkpoint = tmp_path / "atlas.ckpt"
    settings = arch.training_settings()
    micro_batch = AtlasTask.micro_batch

    def killed_at_step_2(self, step, micro):
        if step == 2:
            raise _Killed
        return micro_batch(self, step, micro)

    started.clear()
    monkeypatch.setattr(AtlasTask, "micro_batch", killed_at_step_2)
    with pytest.raises(_Killed):
        _atlas(root, tiny_encoder, **overrides).train(TrainRun(checkpoint=checkpoint, settings=settings, progress=False))
    assert started == [1] and checkpoint.exists()
    monkeypatch.setattr(AtlasTask, "micro_batch", micro_batch)
    started.clear()
    resumed = _atlas(root, tiny_encoder, **overrides).train(TrainRun(checkpoint=checkpoint, settings=settings, progress=False))
    assert resumed["training"]["resumed_from"] == 2 and resumed["training"]["steps"] == 4
    assert started == [3] and resumed["refresh"]["index_version"] == 2
    again = {**_weights(out / "reader"), **_weights(out / "retriever")}
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)
    assert (out / "retriever" / "index" / "dense.faiss").read_bytes() == index_bytes


def test_query_side_training_keeps_passage_tower_and_workspace_index(copy_workspace):
    import faiss

    from ragops.cost import CostMeter
    from ragops.retrieval.retriever import load_encoder
    from ragops.retrieval.trainable import load_trained_encoders
    from ragops.training.loop import TrainRun

    root = copy_workspace()
    arch = _atlas(root)  # the smoke profile's atlas: query-side, 2 steps
    ws = arch.ctx.ws
    index_before = {p.relative_to(ws.index_dir): p.read_bytes() for p in ws.index_dir.rglob("*") if p.is_file()}
    with CostMeter("train") as meter:
        info = arch.train(TrainRun(meter=meter, progress=False))
    assert {p.relative_to(ws.index_dir): p.read_bytes() for p in ws.index_dir.rglob("*") if p.is_file()} == index_before
    assert meter.counters["index_refreshes"] == 0 and info["refresh"] == {}
    base = load_encoder(arch.ctx.config.embed).model.state_dict()
    trained = arch.artifact_dir / "retriever"
    query, passage = load_trained_encoders(trained, device="cpu")
    assert passage is not None and passage.model.state_dict().keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in passage.model.state_dict().items())
    assert any(not torch.equal(v, base[k]) for k, v in query.model.state_dict().items())
    index = faiss.read_index(str(trained / "index" / "dense.faiss"))
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), np.load(ws.embeddings_dir / "vectors.npy"))
    assert info["retriever_trainable_params"] == sum(v.numel() for v in query.model.parameters())


def test_train_and_evaluate_smoke_with_the_reader_only_control(copy_workspace):
    """`ragops train` + `ragops evaluate` for atlas and atlas_reader_only (2 steps each): both
    evaluate with the merged reader; only atlas has a tuned retriever; training used train-split
    questions only."""
    from ragops import stages
    from ragops.io import read_json
    from ragops.params import load_config
    from ragops.paths import Workspace

    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    for name in ("atlas", "atlas_reader_only"):
        stages.train_architecture(ws, config, name, progress=False)
        stages.evaluate_architecture(ws, config, name, progress=False)
    questions = pd.read_parquet(ws.questions)
    split_of = dict(zip(questions["qid"], questions["split"], strict=True))
    for name in ("atlas", "atlas_reader_only"):
        out = ws.architecture_dir(name)
        manifest = read_json(out / "manifest.json")["info"]
        examples = read_json(out / "examples.json")
        assert {split_of[q] for q in examples["train"] + examples["dev"]} == {"train"}
        assert not set(examples["train"]) & set(examples["dev"]) and len(examples["train"]) == manifest["examples"]["train"]
        assert manifest["training"]["steps"] == 2 and (out / "reader" / "finetune.json").exists()
        metrics = read_json(ws.metrics_file(name))
        assert {"describe/f1", "identify/f1", "lm/token_ppl", "train/optimizer_steps"} <= set(metrics)
        info = read_json(ws.eval_dir(name) / "info.json")
        assert info["lm"]["path"].endswith("+reader")  # the merged fine-tuned reader answered
        predictions = pd.read_parquet(ws.eval_dir(name) / "predictions.parquet")
        qa = predictions[predictions["task"] != "lm"]
        assert qa["shown_doc_ids"].map(len).eq(2).all()  # K = 2 passages in the smoke profile
    atlas = read_json(ws.architecture_dir("atlas") / "manifest.json")["info"]
    control = read_json(ws.architecture_dir("atlas_reader_only") / "manifest.json")["info"]
    assert (ws.architecture_dir("atlas") / "retriever" / "index" / "meta.json").exists()
    assert not (ws.architecture_dir("atlas_reader_only") / "retriever").exists()
    assert control["retriever_trainable_params"] == 0 and atlas["retriever_trainable_params"] > 0
    assert control["reader_trainable_params"] == atlas["reader_trainable_params"] > 0
    assert atlas["objective"]["kl"] == {"direction": "teacher_student", "reduction": "batchmean"}


def test_lm_task_retrieval_cache_belongs_to_the_tuned_retriever(copy_workspace):
    """The `lm` task's retrieval cache (In-Context RALM's, by offsets) of a trained architecture is
    keyed by its tuned retriever's index: results of the untuned retriever, or of an earlier
    training, are never reused."""
    arch = _atlas(copy_workspace())
    untuned = arch.open_cache(None).path
    meta = arch.artifact_dir / "retriever" / "index" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"query_fingerprint": "first training"}')
    first = arch.open_cache(None).path
    meta.write_text('{"query_fingerprint": "second training"}')
    second = arch.open_cache(None).path
    assert len({untuned, first, second}) == 3
