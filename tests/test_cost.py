"""Compute accounting: the same keys for every phase, real CPU/wall measurements, FLOP estimates."""

import pytest

from ragops.cost import COUNTERS, CostMeter, forward_flops, training_flops


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


def test_meter_measures_cpu_and_wall_time_of_real_work():
    with CostMeter("inference") as meter:
        total = _work(2_000_000)
        meter.add(tokens_prompt=100, tokens_generated=10, questions=4, retrieval_calls=2)
    assert total > 0
    assert meter.wall_s > 0.01
    assert meter.cpu_s > 0.01
    assert meter.peak_rss_mb > 10
    metrics = meter.metrics(cpu_hour_usd=3600.0)
    assert metrics["inference/tokens_prompt"] == 100
    assert metrics["inference/cost_usd"] == pytest.approx(meter.cpu_s, rel=1e-6)
    assert all(f"inference/{name}" in metrics for name in COUNTERS)
    # no per-question key for the phase as a whole: it would divide every task's time by the QA count
    assert not any("per_1k" in key for key in metrics)


def test_each_part_is_metered_and_normalised_by_its_own_unit():
    with CostMeter("inference") as meter:
        with meter.part("qa", "questions") as qa:
            _work(1_500_000)
            meter.add(questions=4, flops=4e9, retrieval_calls=4)
            qa.units += 4
        _work(300_000)  # between parts: the whole's, no part's
        with meter.part("lm", "tokens") as lm:
            _work(1_500_000)
            meter.add(flops=2e9, tokens_scored=500)
            lm.units += 500
    metrics = meter.metrics(cpu_hour_usd=3600.0)
    assert metrics["inference/qa/flops"] == 4e9 and metrics["inference/lm/flops"] == 2e9 and metrics["inference/flops"] == 6e9
    assert metrics["inference/qa/retrieval_calls"] == 4 and metrics["inference/lm/retrieval_calls"] == 0
    assert metrics["inference/qa/questions"] == 4 and metrics["inference/lm/tokens"] == 500
    assert metrics["inference/qa/wall_s_per_1k_questions"] == pytest.approx(meter.parts["qa"].wall_s / 4 * 1000)
    assert metrics["inference/qa/cost_usd_per_1k_questions"] == pytest.approx(meter.parts["qa"].cpu_s / 4 * 1000)
    assert metrics["inference/lm/cost_usd_per_1k_tokens"] == pytest.approx(meter.parts["lm"].cpu_s / 500 * 1000)
    assert metrics["inference/lm/flops_per_1k_tokens"] == pytest.approx(2e9 / 500 * 1000)
    parts = meter.parts["qa"].wall_s + meter.parts["lm"].wall_s
    assert 0 < parts < meter.wall_s  # the work between the parts belongs to neither
    assert meter.parts["qa"].wall_s > 0.01 and meter.parts["lm"].wall_s > 0.01
    with pytest.raises(ValueError, match="counted in questions"):
        with meter.part("qa", "tokens"):
            pass


def test_train_and_inference_keys_do_not_mix():
    with CostMeter("train") as train:
        train.add(tokens_scored=5)
    assert all(key.startswith("train/") for key in train.metrics())
    # a meter that was never entered (nothing trained) reports exactly zero
    idle = CostMeter("train").metrics()
    assert idle["train/wall_s"] == 0.0 and idle["train/cpu_s"] == 0.0 and idle["train/cost_usd"] == 0.0


def test_unknown_counter_is_refused():
    meter = CostMeter()
    with pytest.raises(KeyError, match="unknown cost counter 'tokens'"):
        meter.add(tokens=1)


def test_forward_flops_match_the_published_per_layer_count():
    """Hoffmann et al. 2022 (Chinchilla), Appendix F, forward FLOPs of one sequence of S tokens,
    written out term by term for a small model (softmax and embeddings left out, as ragops does):
      key/query/value projections  2·3·S·d·(h·k)
      key @ query logits           2·S·S·(h·k)
      softmax @ query reductions   2·S·S·(h·k)
      final linear                 2·S·(h·k)·d
      dense block                  2·S·(d·f + d·f)
      final logits                 2·S·d·V
    with every token attending to all S positions (context = S)."""
    d, h, k, f, layers, vocab, seq = 64, 4, 16, 256, 3, 100, 32
    attention = 2 * 3 * seq * d * (h * k) + 2 * seq * seq * (h * k) + 2 * seq * seq * (h * k) + 2 * seq * (h * k) * d
    dense = 2 * seq * (d * f + d * f)
    chinchilla = layers * (attention + dense) + 2 * seq * d * vocab
    # the same model's non-embedding parameters: 4·d² per attention block, 2·d·f per MLP, the output projection
    n_params = layers * (4 * d * d + 2 * d * f) + d * vocab
    assert forward_flops(n_params, seq, n_layers=layers, d_model=d, context=seq) == chinchilla
    # Kaplan et al. 2020, Table 1 gives C_forward = 2N + 2·n_layer·n_ctx·d_attn per token: the
    # attention-value product (the second 2·n_layer·n_ctx·d_attn) is what that row leaves out
    kaplan = seq * (2 * n_params + 2 * layers * seq * d)
    assert forward_flops(n_params, seq, n_layers=layers, d_model=d, context=seq) - kaplan == seq * 2 * layers * seq * d
    # training: forward plus backward, 3x the forward
    assert training_flops(n_params, seq, n_layers=layers, d_model=d, context=seq) == 3 * chinchilla
    assert forward_flops(1_000, 10) == 20_000  # no attention term without layers/context
