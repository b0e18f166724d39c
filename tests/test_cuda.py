"""The CUDA path (runs only where a GPU is present; CI has none): the encoder and the LM pick CUDA
by themselves, give the CPU's results, and the cost meter reports GPU time and memory."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_lm_scores_and_generates_on_cuda_like_on_cpu(tmp_path):
    from ragops.lm.model import CausalLM
    from tests.builders import build_tiny_lm

    path = build_tiny_lm(tmp_path / "lm")
    gpu = CausalLM.load(path, device="auto")
    cpu = CausalLM.load(path, device="cpu")
    assert gpu.device.type == "cuda"
    contexts = ["The river Thames flows through", "Mona Lisa was painted by", "The river Thames flows through"]
    targets = [" London.", " Leonardo da Vinci.", " Oxford and London."]
    for g, c in zip(gpu.score(contexts, targets), cpu.score(contexts, targets), strict=True):
        np.testing.assert_allclose(g, c, atol=2e-3)
    assert gpu.generate(contexts[:2], max_new_tokens=6) == cpu.generate(contexts[:2], max_new_tokens=6)


def test_encoder_embeds_on_cuda_like_on_cpu(tmp_path):
    from ragops.retrieval.embed import Encoder
    from tests.builders import build_tiny_encoder

    path = build_tiny_encoder(tmp_path / "encoder")
    gpu = Encoder.load(str(path), device="auto")
    cpu = Encoder.load(str(path), device="cpu")
    assert gpu.device.startswith("cuda")
    texts = ["Who painted the Mona Lisa?", "The Thames is a river in England.", "Black holes bend light."]
    np.testing.assert_allclose(gpu.encode(texts, progress=False), cpu.encode(texts, progress=False), atol=1e-4)


def test_cost_meter_reports_gpu_time_and_memory():
    from ragops.cost import CostMeter

    torch.zeros(1, device="cuda")  # CUDA initialised: the meter meters the GPU
    with CostMeter("inference") as meter:
        a = torch.randn(2048, 2048, device="cuda")
        (a @ a).sum().item()
    metrics = meter.metrics()
    assert metrics["inference/gpu_s"] > 0
    assert metrics["inference/gpu_peak_mb"] >= 2048 * 2048 * 4 / 2**20
