"""Compute accounting: the same keys for every phase, real CPU/wall measurements, FLOP estimates."""

import pytest

from ragops.cost import COUNTERS, CostMeter, forward_flops, training_flops


def test_meter_measures_cpu_and_wall_time_of_real_work():
    with CostMeter("inference") as meter:
        total = sum(i * i for i in range(2_000_000))
        meter.add(tokens_prompt=100, tokens_generated=10, questions=4, retrieval_calls=2)
    assert total > 0
    assert meter.wall_s > 0.01
    assert meter.cpu_s > 0.01
    assert meter.peak_rss_mb > 10
    metrics = meter.metrics(cpu_hour_usd=3600.0)
    assert metrics["inference/tokens_prompt"] == 100
    assert metrics["inference/cost_usd"] == pytest.approx(meter.cpu_s, rel=1e-6)
    assert metrics["inference/wall_s_per_1k_questions"] == pytest.approx(meter.wall_s / 4 * 1000)
    assert all(f"inference/{name}" in metrics for name in COUNTERS)


def test_train_and_inference_keys_do_not_mix():
    with CostMeter("train") as train:
        train.add(tokens_scored=5)
    assert all(key.startswith("train/") for key in train.metrics())
    assert "train/wall_s_per_1k_questions" not in train.metrics()


def test_unknown_counter_is_refused():
    meter = CostMeter()
    with pytest.raises(KeyError, match="unknown cost counter 'tokens'"):
        meter.add(tokens=1)


def test_flop_estimates():
    assert forward_flops(1_000, 10) == 20_000
    assert training_flops(1_000, 10) == 60_000
    assert forward_flops(1_000, 10, n_layers=2, d_model=4, context=8) == 20_000 + 2 * 2 * 8 * 4 * 10
