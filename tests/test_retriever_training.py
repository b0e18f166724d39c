"""Retriever fine-tuning under a frozen LM (REPLUG LSR, AAR) on the smoke workspace: training data
from the train split only, the objectives against hand computations, the train stage end to end
(artifacts, loss curves, cost), resumption after kill -9, and evaluation with the tuned retriever."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.errors import RagopsError
from ragops.paths import Workspace
from ragops.params import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --- training data -------------------------------------------------------------------------------------

def test_training_data_comes_from_the_train_split_only(smoke_workspace):
    from ragops.training.data import assert_clean_training_data, forbidden_doc_ids, lm_windows, train_questions

    ws = Workspace(smoke_workspace)
    questions = pd.read_parquet(ws.questions)
    picked = train_questions(ws, per_task=5, seed=1)
    assert set(picked["split"]) == {"train"} and set(picked["task"]) == {"describe", "identify"} and len(picked) == 10
    assert picked.equals(train_questions(ws, per_task=5, seed=1))  # seeded
    heldout = set(pd.read_parquet(ws.heldout)["doc_id"])
    evaluated = set(questions.loc[questions["split"] != "train", "gold_doc_id"])
    assert forbidden_doc_ids(ws) == heldout | evaluated
    windows = lm_windows(ws, 12, lambda t: t.split(), lambda ids: " ".join(ids), prefix_tokens=5, target_tokens=5, seed=1)
    assert len(windows) == 12 and not {w.doc_id for w in windows} & (heldout | evaluated)
    dev_q = questions.loc[questions["split"] == "dev", "qid"].iloc[0]
    with pytest.raises(RagopsError, match="leakage: 1 training example.*dev question"):
        assert_clean_training_data(ws, qids=[picked["qid"].iloc[0], dev_q])
    with pytest.raises(RagopsError, match="held-out or dev/test article"):
        assert_clean_training_data(ws, text_doc_ids=[sorted(heldout)[0]])


# --- objectives --------------------------------------------------------------------------------------

def test_aar_contrastive_loss_by_hand():
    from ragops.architectures.aar import contrastive_loss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    # query 0: positives columns 0 and 1; query 1: positive column 2; column 3 is the same chunk as column 0
    ids = ["a", "b", "c", "a"]
    loss = contrastive_loss(q, p, [[0, 1], [2]], temperature=0.5, column_ids=ids)
    s = (q @ p.T / 0.5).numpy()

    def term(b, j, negatives):
        return -s[b, j] + math.log(math.exp(s[b, j]) + sum(math.exp(s[b, n]) for n in negatives))

    q0 = (term(0, 0, [2]) + term(0, 1, [2])) / 2  # column 3 ("a") is query 0's positive passage: never its negative
    q1 = term(1, 2, [0, 1, 3])
    assert float(loss) == pytest.approx((q0 + q1) / 2, abs=1e-6)


def test_passage_spans_from_offsets():
    from ragops.architectures.aar import passage_spans

    offsets = [(0, 3), (3, 8), (8, 9), (9, 15), (15, 20), (0, 0)]
    assert passage_spans(offsets, [(3, 9), (12, 20), (30, 40)]) == [(1, 3), (3, 5), (0, 0)]


def test_black_box_view_exposes_no_weights(tiny_lm_dir):
    from ragops.cost import CostMeter
    from ragops.lm import CausalLM
    from ragops.lm.blackbox import BlackBoxLM, LocalBlackBox

    box = LocalBlackBox(CausalLM.load(tiny_lm_dir, device="cpu"))
    assert isinstance(box, BlackBoxLM)
    for attribute in ("model", "tokenizer", "lm", "parameters"):
        assert not hasattr(box, attribute)
    with pytest.raises(AttributeError):
        box.extra = 1  # nothing can be attached either
    meter = CostMeter()
    scores = box.logprobs(["The river"], [" flows"], meter=meter)
    assert len(scores) == 1 and len(scores[0]) == box.count_tokens(" flows")
    assert meter.counters["tokens_scored"] == len(scores[0]) and meter.counters["flops"] > 0


# --- the train stage end to end -------------------------------------------------------------------

LSR_SMOKE = {"qa_examples": 3, "lm_examples": 1, "candidates": 3, "refresh_every": 2, "swap_after": 1, "k": 2,
             "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 1}}


def _config(root: Path, **arch):
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, options in arch.items():
        params.setdefault("profiles", {}).setdefault("smoke", {}).setdefault("architectures", {})[name] = options
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_config(root / "params.yaml")


def _weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / "artifacts/models/replug_lsr/retriever/query_encoder/model.safetensors"))


def test_replug_lsr_trains_resumes_after_kill_and_evaluates_with_its_retriever(copy_workspace, smoke_workspace, tmp_path, monkeypatch):
    import mlflow

    from ragops import stages
    from ragops.io import read_json

    # 1. an uninterrupted training
    root_a = copy_workspace()
    ws_a = Workspace(root_a)
    config = _config(root_a, replug_lsr=LSR_SMOKE)
    outcome = stages.train_architecture(ws_a, config, "replug_lsr", progress=False)
    model_dir = ws_a.architecture_dir("replug_lsr")
    manifest = read_json(model_dir / "manifest.json")
    assert not outcome.skipped and manifest["info"]["training"]["steps"] == 3
    assert manifest["info"]["objective"]["direction"] == "student_teacher"
    index_meta = read_json(model_dir / "retriever/index/meta.json")
    assert index_meta["count"] == len(pd.read_parquet(ws_a.chunks)) and index_meta["towers"] == "shared"
    cost = read_json(model_dir / "train_cost.json")
    assert cost["train/optimizer_steps"] == 3
    assert cost["train/index_refreshes"] == 2  # one during training (step 2) + the final re-index
    assert cost["train/encoder_passes"] > 2 * len(pd.read_parquet(ws_a.chunks)) and cost["train/tokens_scored"] > 0
    # loss curves: MLflow metric history, one point per step, and a PNG
    history = mlflow.MlflowClient().get_metric_history(outcome.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert (ws_a.plots_dir / "training-replug_lsr.png").exists()
    assert not list((ws_a.cache_dir / "checkpoints" / "replug_lsr").glob("*.ckpt"))  # removed after success
    tuned = read_json(model_dir / "retrieval_eval.json")  # the tuned retriever's recall, beside the untuned ones
    assert 0.0 <= tuned["test/dense:replug_lsr/recall_at_1"] <= tuned["test/dense:replug_lsr/recall_at_10"] <= 1.0
    # the same settings: nothing to do; the teacher's scores are cached on disk
    assert stages.train_architecture(ws_a, config, "replug_lsr", progress=False).skipped

    # 2. the same training killed (SIGKILL) after its first checkpoint, then re-run: resumes
    root_b = _copy(Path(smoke_workspace), tmp_path / "b")
    (root_b / "params.yaml").write_text((root_a / "params.yaml").read_text())
    ws_b = Workspace(root_b)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root_b / 'mlruns' / 'mlflow.db'}")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    ragops_bin = str(Path(sys.executable).with_name("ragops"))
    process = subprocess.Popen([ragops_bin, "train", "replug_lsr"], cwd=root_b, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    checkpoint_dir = ws_b.cache_dir / "checkpoints" / "replug_lsr"
    while time.time() < deadline and not list(checkpoint_dir.glob("[!.]*.ckpt")) and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (ws_b.architecture_dir("replug_lsr") / "manifest.json").exists()  # no half-written model is visible
    config_b = load_config(root_b / "params.yaml")
    resumed = stages.train_architecture(ws_b, config_b, "replug_lsr", progress=False)
    assert read_json(ws_b.architecture_dir("replug_lsr") / "manifest.json")["info"]["training"]["resumed_from"] >= 1
    a, b = _weights(root_a), _weights(root_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    assert not resumed.skipped

    # 3. evaluation retrieves with the tuned retriever, not the workspace's
    from ragops.evaluation.runner import build_architecture

    arch = build_architecture("replug_lsr", ws_a, config, progress=False)
    dense = arch.ctx.retriever("dense")
    assert dense.encoder.fingerprint == index_meta["query_fingerprint"]
    assert dense.encoder.fingerprint != read_json(ws_a.index_dir / "meta.json")["fingerprint"]
    evaluated = stages.evaluate_architecture(ws_a, config, "replug_lsr", progress=False)
    metrics = read_json(ws_a.metrics_file("replug_lsr"))
    assert not evaluated.skipped and metrics["train/optimizer_steps"] == 3 and metrics["inference/retrieval_calls"] > 0


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_aar_trains_with_the_proxy_only(copy_workspace, tiny_lm_dir, tmp_path):
    """Two different tiny LMs: the proxy reads the passages in training; the target LM is never loaded."""
    from ragops import stages
    from ragops.evaluation.runner import build_architecture
    from ragops.io import read_json
    from ragops.lm import CausalLM

    proxy_dir = tmp_path / "proxy-lm"
    proxy = CausalLM.load(tiny_lm_dir, device="cpu")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in proxy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    proxy.model.save_pretrained(proxy_dir)
    proxy.tokenizer.save_pretrained(proxy_dir)

    root = copy_workspace()
    ws = Workspace(root)
    config = _config(root, aar={"proxy_model": str(proxy_dir), "qa_examples": 3, "n_candidates": 3, "passage_tokens": 16,
                                "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1}})
    arch = build_architecture("aar", ws, config, progress=False)
    from ragops.cost import CostMeter
    from ragops.lm.model import resolve_device
    from ragops.training.loop import TrainRun

    with CostMeter("train") as meter:
        info = arch.train(TrainRun(meter=meter, progress=False, device=resolve_device("cpu")))
    assert arch.ctx.lm_override is None  # the target LM was never loaded, let alone consulted
    assert meter.counters["flops"] > 0 and meter.counters["optimizer_steps"] == 2
    prefs = info["preferences"]
    assert prefs["with_positives"] >= 1 and 0.0 <= prefs["gold_agreement"] <= 1.0
    assert read_json(ws.architecture_dir("aar") / "retriever/index/meta.json")["towers"] == "shared"
    # a proxy that cannot be loaded: one line naming the key
    bad = _config(root, aar={"proxy_model": str(tmp_path / "nowhere"), "qa_examples": 3, "n_candidates": 3,
                             "train": {"steps": 1, "batch_size": 2}})
    with pytest.raises(RagopsError, match=r"architectures.aar.proxy_model: .*nowhere"):
        stages.train_architecture(ws, bad, "aar", progress=False)
