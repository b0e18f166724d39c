"""SELF-RAG: the reflection vocabulary (single ids, resized tied rows, trained rows), the loss mask,
the probability-space retrieval threshold, the critique scores and the critic-label procedure
against hand computations, and a train + evaluate smoke run with the control through ragops.stages."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.architectures.self_rag import (
    FULLY,
    IRRELEVANT,
    NO_RETRIEVAL,
    NO_SUPPORT,
    PARAGRAPH_CLOSE,
    PARAGRAPH_OPEN,
    PARTIALLY,
    REFLECTION_TOKENS,
    RELEVANT,
    RETRIEVAL,
    UTILITY,
    choose_passage,
    critique_score,
    generator_example,
    relevance_label,
    relevance_score,
    retrieval_probability,
    retrieve_label,
    should_retrieve,
    support_label,
    support_score,
    utility_label,
    utility_score,
)
from ragops.errors import RagopsError


def _tiny_lm(path):
    from ragops.lm.model import CausalLM

    return CausalLM.load(str(path), device="cpu")


# --- vocabulary ------------------------------------------------------------------------------------


def test_reflection_tokens_are_single_ids_on_resized_tied_rows_that_training_changes(tiny_lm_dir, tmp_path):
    from ragops.lm.finetune import add_special_tokens, causal_lm_loss, load_finetuned, lora_model, save_adapter

    lm = _tiny_lm(tiny_lm_dir)
    before = lm.model.get_input_embeddings().weight.detach().clone()
    ids = add_special_tokens(lm, REFLECTION_TOKENS)
    assert len(REFLECTION_TOKENS) == 15 and len(set(ids)) == 15 and min(ids) >= before.shape[0]
    for token, token_id in zip(REFLECTION_TOKENS, ids, strict=True):
        assert lm.tokenizer.encode(token, add_special_tokens=False) == [token_id]
    text = f"{RETRIEVAL}{PARAGRAPH_OPEN}a river{PARAGRAPH_CLOSE}{RELEVANT}Paris{FULLY}{UTILITY[4]}"
    encoded = lm.encode(text)
    assert [t for t in encoded if t in ids] == [ids[0], ids[13], ids[14], ids[3], ids[5], ids[12]]
    embeddings, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    assert embeddings.shape[0] == before.shape[0] + 15 == lm.vocab_size
    assert embeddings.data_ptr() == head.data_ptr()  # still tied: one new row per token serves input and output
    torch.testing.assert_close(embeddings[: before.shape[0]].detach(), before)

    torch.manual_seed(0)
    model = lora_model(lm, r=4, alpha=8, dropout=0.0, trainable_token_ids=ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seq = lm.encode("Question: where?\nAnswer:") + [ids[1]] + lm.encode(" Paris") + [ids[8]]
    mask = [False] * 6 + [True] * (len(seq) - 6)
    for _ in range(2):
        optimizer.zero_grad()
        loss, _ = causal_lm_loss(model, [seq], [mask], lm.pad_id)
        loss.backward()
        optimizer.step()
    trained_rows = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n).detach().clone()
    assert trained_rows.shape == (15, embeddings.shape[1])
    save_adapter(model, tmp_path / "gen", base=tiny_lm_dir, tokenizer=lm.tokenizer, save_embedding_layers=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "gen" / "adapter" / "adapter_model.safetensors"))
    assert not [k for k in saved if k.endswith(("embed_tokens.weight", "lm_head.weight"))]  # only the 15 rows, not the matrix
    loaded = load_finetuned(tmp_path / "gen", tiny_lm_dir, _config())
    weight = loaded.model.get_input_embeddings().weight
    assert loaded.vocab_size == before.shape[0] + 15 and weight.data_ptr() == loaded.model.get_output_embeddings().weight.data_ptr()
    assert [loaded.tokenizer.convert_tokens_to_ids(t) for t in REFLECTION_TOKENS] == ids
    torch.testing.assert_close(weight[: before.shape[0]].detach(), before)  # old rows untouched
    torch.testing.assert_close(weight[ids].detach(), trained_rows)  # the trained rows, merged (input = output row)
    assert not torch.allclose(weight[ids[1]].detach(), embeddings[ids[1]].detach())  # training moved a reflection row

    other = tmp_path / "other-lm"
    shutil.copytree(tiny_lm_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(RagopsError) as refused:
        load_finetuned(tmp_path / "gen", other, _config())
    message = str(refused.value)
    assert "\n" not in message and str(tiny_lm_dir) in message and str(other) in message


def _config():
    from ragops.config import LMConfig

    return LMConfig(device="cpu")


# --- loss mask -------------------------------------------------------------------------------------


def test_generator_examples_mask_prompt_and_passage_and_the_loss_reads_only_the_rest(tiny_lm_dir):
    from ragops.lm.finetune import causal_lm_loss

    ids = {t: 400 + i for i, t in enumerate(REFLECTION_TOKENS)}
    prompt, passage, answer, end = [5, 6, 7], [8, 9], [10, 11], [0]
    seq, mask = generator_example(prompt, answer, end, ids, passage=passage, rel=IRRELEVANT, sup=PARTIALLY, utility=UTILITY[2])
    assert seq == [5, 6, 7, 400, 413, 8, 9, 414, 404, 10, 11, 406, 410, 0]
    assert mask == [False, False, False, True, False, False, False, False, True, True, True, True, True, True]
    seq2, mask2 = generator_example(prompt, answer, end, ids, utility=UTILITY[0])
    assert seq2 == [5, 6, 7, 401, 10, 11, 408, 0] and mask2 == [False] * 3 + [True] * 5

    lm = _tiny_lm(tiny_lm_dir)
    seq = [min(t, lm.vocab_size - 1) for t in seq]  # ids the tiny vocabulary has
    loss, n = causal_lm_loss(lm.model, [seq], [mask], lm.pad_id)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([seq])).logits[0].float(), dim=-1)
    expected = [-float(logp[t - 1, seq[t]]) for t in range(1, len(seq)) if mask[t]]
    assert n == 7 and loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # a change inside the masked passage changes the context, not the set of scored targets
    assert n == sum(mask[1:])


# --- inference scores ------------------------------------------------------------------------------


def test_retrieval_threshold_is_on_probabilities_not_log_probabilities():
    delta = 0.2
    # p(Ret)=0.10, p(NoRet)=0.85: the probability ratio 0.105 says no; the reference's log-prob ratio
    # log(.1)/(log(.1)+log(.85)) = 0.934 would retrieve.
    lr, ln = math.log(0.10), math.log(0.85)
    assert lr / (lr + ln) > delta
    assert retrieval_probability(lr, ln) == pytest.approx(0.10 / 0.95)
    assert not should_retrieve(lr, ln, delta)
    # p(Ret)=0.5, p(NoRet)=0.01: the log-prob ratio 0.131 says no; probabilities say retrieve.
    lr, ln = math.log(0.5), math.log(0.01)
    assert lr / (lr + ln) < delta
    assert should_retrieve(lr, ln, delta)


def test_critique_scores_match_hand_computations():
    assert relevance_score(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert support_score(math.log(0.5), math.log(0.3), math.log(0.1)) == pytest.approx((0.5 + 0.15) / 0.9)
    assert utility_score([math.log(p) for p in (0.1, 0.2, 0.3, 0.2, 0.2)]) == pytest.approx(-0.1 - 0.1 + 0.0 + 0.1 + 0.2)
    certain_u5 = [-80.0, -80.0, -80.0, -80.0, 0.0]  # p(Utility:5) = 1 gives w_use (not the IsSup tokens)
    assert critique_score([], 0.0, 0.0, utility_score(certain_u5), w_rel=1, w_sup=1, w_use=0.5) == pytest.approx(0.5)
    total = critique_score([-0.5, -1.5], 0.75, 0.65, 0.1, w_rel=1.0, w_sup=1.0, w_use=0.5)
    assert total == pytest.approx(math.exp(-1.0) + 0.75 + 0.65 + 0.05)
    assert critique_score([-0.5, -1.5], 0.75, 0.65, 0.1, w_rel=1.0, w_sup=1.0, w_use=0.5, use_seqscore=False) == pytest.approx(1.45)


def test_critique_readout_matches_plain_forwards(tiny_lm_dir):
    """The shared-prefix read-out equals log-softmax read off full forwards: answer tokens after the
    head, IsSup after the answer, IsUse after the more likely IsSup token."""
    from ragops.architectures.self_rag import SUPPORT_TOKENS, critique_readout
    from ragops.lm.finetune import add_special_tokens

    lm = _tiny_lm(tiny_lm_dir)
    ids = dict(zip(REFLECTION_TOKENS, add_special_tokens(lm, REFLECTION_TOKENS), strict=True))
    heads = [lm.encode("Rivers and bridges of the old town, a long passage about painters.") + [ids[RELEVANT]],
             lm.encode("Planets circle the sun; a second passage of some length here.") + [ids[IRRELEVANT]]]
    answers = [lm.encode(" the river"), []]
    answer_lp, sup, use = critique_readout(lm, heads, answers, ids)

    def logp(seq):
        with torch.no_grad():
            return torch.log_softmax(lm.model(torch.tensor([seq])).logits[0].float(), dim=-1)

    for n, (head, answer) in enumerate(zip(heads, answers, strict=True)):
        full = logp(head + answer)
        expected_answer = [float(full[len(head) - 1 + t, tok]) for t, tok in enumerate(answer)]
        np.testing.assert_allclose(answer_lp[n], expected_answer, atol=1e-4)
        expected_sup = [float(full[-1, ids[t]]) for t in SUPPORT_TOKENS]
        np.testing.assert_allclose(sup[n], expected_sup, atol=1e-4)
        best = ids[SUPPORT_TOKENS[int(np.argmax(expected_sup))]]
        after = logp(head + answer + [best])[-1]
        np.testing.assert_allclose(use[n], [float(after[ids[t]]) for t in UTILITY], atol=1e-4)


def test_reflection_tokens_never_reach_the_prediction():
    from ragops.architectures.self_rag import strip_reflection

    assert strip_reflection(" Paris[Fully supported][Utility:5]") == "Paris"
    assert strip_reflection("[Relevant]the  Eiffel[No support / Contradictory] Tower") == "the Eiffel Tower"
    assert strip_reflection(" Rome\n") == "Rome"


# --- critic labels ---------------------------------------------------------------------------------


def test_critic_label_procedure_on_a_hand_made_example():
    passage = "Eiffel Tower\nThe Eiffel Tower is a wrought-iron lattice tower in Paris."
    assert support_label("The Eiffel Tower", passage) == FULLY  # eiffel, tower: 2/2
    assert support_label("Eiffel bridge", passage) == PARTIALLY  # 1/2
    assert support_label("the Louvre museum", passage) == NO_SUPPORT  # 0/2
    assert retrieve_label(nll_closed=2.0, nll_with_gold=1.5, margin=0.1) == RETRIEVAL
    assert retrieve_label(nll_closed=2.0, nll_with_gold=1.95, margin=0.1) == NO_RETRIEVAL
    assert relevance_label("d7", "d7") == RELEVANT and relevance_label("d8", "d7") == IRRELEVANT
    assert utility_label("Paris France", "Paris") == "[Utility:4]"  # F1 = 2/3 -> 1 + round(2.67) = 4
    assert utility_label("Paris", "Paris") == "[Utility:5]" and utility_label("Rome", "Paris") == "[Utility:1]"
    rng = np.random.default_rng(0)
    assert choose_passage([(IRRELEVANT, FULLY), (RELEVANT, PARTIALLY), (RELEVANT, FULLY)], rng) == 2
    picks = [choose_passage([(IRRELEVANT, NO_SUPPORT), (RELEVANT, PARTIALLY)], np.random.default_rng(s)) for s in range(2000)]
    # index 1 when the 0.7 draw succeeds, else index 0 with probability 0.3·0.25 or a random one (0.3·0.75·0.5 each)
    assert np.mean([p == 1 for p in picks]) == pytest.approx(0.7 + 0.3 * 0.75 * 0.5, abs=0.04)


# --- train + evaluate ----------------------------------------------------------------------------


def test_train_resume_and_evaluate_smoke_with_the_always_retrieve_control(copy_workspace, monkeypatch):
    """`ragops train` (killed and resumed, see `_train_killed_and_resumed`) + `ragops evaluate` for
    self_rag (critic + generator, 2 steps each) and self_rag_always: training questions and passages
    only from the train split, the critic's held-out
    agreement recorded, the merged generator answers without reflection tokens in its predictions,
    retrieval rate and δ sweep reported."""
    from ragops import stages
    from ragops.io import read_json
    from ragops.params import load_config
    from ragops.paths import Workspace
    from ragops.training.data import forbidden_doc_ids

    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    _train_killed_and_resumed(ws, config, monkeypatch)
    stages.train_architecture(ws, config, "self_rag_always", progress=False)
    for name in ("self_rag", "self_rag_always"):
        stages.evaluate_architecture(ws, config, name, progress=False)
    questions = pd.read_parquet(ws.questions)
    split_of = dict(zip(questions["qid"], questions["split"], strict=True))
    examples = read_json(ws.architecture_dir("self_rag") / "examples.json")
    assert {split_of[q] for q in examples["critic"] + examples["generator"]} == {"train"}
    assert examples["critic"] and not set(examples["critic"]) & set(examples["generator"])
    control_examples = read_json(ws.architecture_dir("self_rag_always") / "examples.json")
    assert control_examples["generator"] == examples["generator"] and control_examples["critic"] == []

    info = read_json(ws.architecture_dir("self_rag") / "manifest.json")["info"]
    assert info["training"]["steps"] == 2 and info["critic"]["training"]["steps"] == 2
    assert info["critic"]["items"]["heldout"] > 0 and 0.0 <= info["critic"]["agreement"]["overall"] <= 1.0
    assert set(info["critic"]["labels"]) == {"retrieve", "isrel", "issup", "isuse"}
    assert info["generator_data"]["retrieval"] + info["generator_data"]["no_retrieval"] == info["examples"]["generator_sequences"] > 0
    assert not set(info["critic"]["labels"]["isrel"]) - {RELEVANT, IRRELEVANT}

    metrics = read_json(ws.metrics_file("self_rag"))
    assert {"describe/f1", "identify/gold_nll", "lm/token_ppl", "inference/describe/retrieval_rate", "train/optimizer_steps"} <= set(metrics)
    assert metrics["train/optimizer_steps"] == 4  # critic 2 + generator 2
    eval_info = read_json(ws.eval_dir("self_rag") / "info.json")
    assert eval_info["lm"]["path"].endswith("+generator")
    predictions = pd.read_parquet(ws.eval_dir("self_rag") / "predictions.parquet")
    qa = predictions[predictions["task"] != "lm"]
    assert not qa["prediction"].str.contains(r"\[(?:Retrieval|No Retrieval|Relevant|Irrelevant|Utility:|Fully|Partially|No support)").any()
    rate = metrics["inference/describe/retrieval_rate"]  # the harness's count of questions that retrieved
    assert rate == pytest.approx(float(qa[qa["task"] == "describe"]["retrieval_calls"].gt(0).mean()))
    assert rate == pytest.approx(eval_info["architecture_info"]["retrieval_rate"]["describe"])  # = SELF-RAG's own decisions
    sweep = pd.read_csv(ws.eval_dir("self_rag") / "delta_sweep.csv")
    assert (ws.eval_dir("self_rag") / "delta_sweep.png").exists()
    assert set(sweep["task"]) == {"describe", "identify"}
    for _, part in sweep.groupby("task"):
        part = part.sort_values("delta")
        assert part["retrieval_rate"].iloc[-1] == 0.0  # δ = 1: p(Ret)/(p(Ret)+p(NoRet)) > 1 never holds
        assert np.all(np.diff(part["retrieval_rate"].to_numpy()) <= 0)  # a higher δ never retrieves more
    describe = sweep[(sweep["task"] == "describe") & (sweep["delta"] == 0.2)].iloc[0]
    assert describe["retrieval_rate"] == pytest.approx(rate)
    assert describe["f1"] == pytest.approx(metrics["describe/f1"])  # the sweep at δ reproduces the evaluation

    control = pd.read_parquet(ws.eval_dir("self_rag_always") / "predictions.parquet")
    control_qa = control[control["task"] != "lm"]
    assert control_qa["shown_doc_ids"].map(len).eq(1).all()  # always the top passage
    assert "describe/retrieval_rate" not in read_json(ws.metrics_file("self_rag_always"))
    forbidden = forbidden_doc_ids(ws)
    for name in ("self_rag", "self_rag_always"):  # passages read in training: never held-out or dev/test articles
        passages = set(read_json(ws.architecture_dir(name) / "examples.json")["passage_doc_ids"])
        assert passages and forbidden and not passages & forbidden


def _train_killed_and_resumed(ws, config, monkeypatch) -> None:
    """Train self_rag uninterrupted, then again killed at the generator's 2nd step and re-run: the
    re-run reuses the critic's labels (no critic step), resumes the generator at step 1 and ends with
    the uninterrupted run's adapter weights; the critic's side files are gone afterwards."""
    from safetensors.torch import load_file

    from ragops import stages
    from ragops.architectures.self_rag import SequenceTask

    def adapter_weights():
        files = sorted((ws.architecture_dir("self_rag") / "generator" / "adapter").glob("*.safetensors"))
        return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}

    stages.train_architecture(ws, config, "self_rag", progress=False)
    uninterrupted = adapter_weights()

    original = SequenceTask.loss
    calls = {"critic": 0, "generator": 0}

    def killed_at_generator_step_2(self, batch):
        kind = "critic" if self.lm.name.endswith("+critic") else "generator"
        calls[kind] += 1
        if kind == "generator" and calls[kind] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(SequenceTask, "loss", killed_at_generator_step_2)
    with pytest.raises(KeyboardInterrupt):
        stages.train_architecture(ws, config, "self_rag", progress=False, force=True)
    assert calls == {"critic": 2, "generator": 2}
    checkpoints = sorted(p.name for p in (ws.cache_dir / "checkpoints" / "self_rag").iterdir())
    assert any(n.endswith(".critic.json") for n in checkpoints) and any(n.endswith(".ckpt") for n in checkpoints)

    calls.update(critic=0, generator=0)
    monkeypatch.setattr(SequenceTask, "loss", lambda self, batch: (calls.__setitem__(
        "critic" if self.lm.name.endswith("+critic") else "generator",
        calls["critic" if self.lm.name.endswith("+critic") else "generator"] + 1), original(self, batch))[1])
    stages.train_architecture(ws, config, "self_rag", progress=False, force=True)
    assert calls == {"critic": 0, "generator": 1}  # the critic's labels were reused; the generator resumed at step 1
    resumed = adapter_weights()
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, msg=key)
    assert not list((ws.cache_dir / "checkpoints" / "self_rag").glob("*.critic*"))
