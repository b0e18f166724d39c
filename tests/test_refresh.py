"""Index refresh (sync and async, swapped at a fixed step, resumable) and the trainable dual encoder,
on a tiny real sentence-transformers encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragops.cost import CostMeter
from ragops.retrieval.embed import Encoder
from ragops.retrieval.trainable import TrainableRetriever
from ragops.training.refresh import IndexRefresher

TEXTS = [f"passage {i} about {topic}" for i, topic in enumerate(["rivers", "planets", "painters", "bridges", "music", "chess"] * 3)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from tests.builders import build_tiny_encoder

    return Encoder.load(str(build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny")), device="cpu")


def perturbed(retriever: TrainableRetriever, scale: float = 0.5) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in retriever.passage_model.parameters():
            p.add_(scale * torch.randn_like(p))
    return retriever.passage_state()


def test_sync_refresh_reembeds_with_the_snapshot_and_counts_it(encoder):
    retriever = TrainableRetriever(encoder, "shared")
    start = encoder.encode(TEXTS, progress=False)
    meter = CostMeter("train")
    refresher = IndexRefresher(TEXTS, retriever.passage_model, start, mode="sync", meter=meter)
    torch.manual_seed(0)
    snapshot = perturbed(retriever)
    refresher.start(3, snapshot)
    expected = Encoder(retriever.passage_model, "x").encode(TEXTS, progress=False)  # the weights of the snapshot
    np.testing.assert_allclose(refresher.vectors, expected, atol=1e-5)
    assert refresher.version == 1 and refresher.index.ntotal == len(TEXTS)
    assert meter.counters["index_refreshes"] == 1 and meter.counters["encoder_passes"] == len(TEXTS)
    assert meter.counters["index_refresh_s"] > 0 and meter.counters["encoder_flops"] > 0
    _, rows = refresher.index.search(expected[:3], 1)
    assert rows[:, 0].tolist() == [0, 1, 2]


def test_async_refresh_keeps_the_stale_index_until_its_swap_step(encoder):
    retriever = TrainableRetriever(encoder, "shared")
    start = encoder.encode(TEXTS, progress=False)
    refresher = IndexRefresher(TEXTS, retriever.passage_model, start, mode="async", swap_after=3)
    torch.manual_seed(1)
    refresher.start(10, perturbed(retriever))
    stale = refresher.index
    assert refresher.pending is not None and refresher.pending.swap_step == 13
    for step in (10, 11, 12):
        refresher.pending.thread.join()  # done or not, the swap waits for its step
        assert not refresher.poll(step) and refresher.index is stale and refresher.version == 0
    assert refresher.poll(13) and refresher.index is not stale and refresher.version == 1
    np.testing.assert_allclose(refresher.vectors, Encoder(retriever.passage_model, "x").encode(TEXTS, progress=False), atol=1e-5)


def test_a_pending_refresh_survives_a_restart_from_its_state(encoder):
    """Killed mid-refresh: the restored refresher uses the stale index and redoes the refresh from the
    same snapshot, swapping it in at the same step."""
    retriever = TrainableRetriever(encoder, "shared")
    start = encoder.encode(TEXTS, progress=False)
    first = IndexRefresher(TEXTS, retriever.passage_model, start, mode="async", swap_after=2)
    torch.manual_seed(2)
    first.start(4, perturbed(retriever))
    state = first.state_dict()
    first.finish()
    reference = first.vectors.copy()

    second = IndexRefresher(TEXTS, retriever.passage_model, start, mode="async", swap_after=2)
    second.load_state_dict(state)
    assert second.version == 0 and second.pending is not None and second.pending.swap_step == 6
    assert not second.poll(5)
    assert second.poll(6)
    np.testing.assert_array_equal(second.vectors, reference)


def test_trainable_retriever_gradients_reach_the_right_towers(encoder):
    shared = TrainableRetriever(encoder, "shared")
    q = shared.embed_queries(["rivers"])
    p = shared.embed_passages(TEXTS[:3])
    assert torch.allclose(q.norm(dim=-1), torch.ones(1)) and p.requires_grad
    (q @ p.T).sum().backward()
    assert any(param.grad is not None and float(param.grad.abs().sum()) > 0 for param in shared.query_model.parameters())

    untied = TrainableRetriever(encoder, "query_side")
    before = {k: v.clone() for k, v in untied.passage_model.state_dict().items()}
    q = untied.embed_queries(["rivers"])
    p = untied.embed_passages(TEXTS[:3])
    assert not p.requires_grad and untied.trainable_parameters == sum(x.numel() for x in untied.query_model.parameters())
    (q @ p.T).sum().backward()
    assert all(param.grad is None for param in untied.passage_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in untied.passage_model.state_dict().items())
    # the workspace encoder itself is never trained in place
    assert all(param.grad is None for param in encoder.model.parameters())


def test_trained_encoders_round_trip(encoder, tmp_path):
    from ragops.retrieval.trainable import load_trained_encoders

    retriever = TrainableRetriever(encoder, "query_side")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in retriever.query_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    retriever.save(tmp_path)
    query, passage = load_trained_encoders(tmp_path, device="cpu")
    np.testing.assert_allclose(query.encode(["chess"], progress=False), retriever.query_encoder().encode(["chess"], progress=False), atol=1e-6)
    np.testing.assert_allclose(passage.encode(["chess"], progress=False), encoder.encode(["chess"], progress=False), atol=1e-6)
