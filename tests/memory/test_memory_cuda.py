"""CUDA checks of the memory models (skipped without a GPU): bf16-mixed training steps stay finite with
float32 memory state, and float32 CUDA outputs match the CPU."""

import pytest
import torch
from timeloom_memory import NeuralMemoryConfig, TitansConfig, TitansLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model(block: str) -> TitansLM:
    torch.manual_seed(0)
    memory = NeuralMemoryConfig(heads=2, head_dim=16, chunk_size=8, surprise_clip=1.0)
    return TitansLM(TitansConfig(vocab_size=64, dim=32, block=block, segment=16, window=8, memory=memory,
                                 hcam_chunk_size=8, hcam_top_k=2))  # fmt: skip


@pytest.mark.parametrize("block", ["lmm", "mac", "mag", "mal", "hcam", "swa"])
def test_cuda_float32_matches_cpu_and_bf16_autocast_trains(block):
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    cpu = model(block)
    gpu = model(block).cuda()
    with torch.no_grad():
        expected, _ = cpu(ids)
        got, _ = gpu(ids.cuda())
    torch.testing.assert_close(got.cpu(), expected, atol=2e-3, rtol=2e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, states = gpu(ids.cuda())
        streamed, _ = gpu(ids.cuda(), states)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.cuda().flatten())
    loss.backward()
    assert torch.isfinite(streamed).all()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
    for state in states:
        weights = getattr(state.memory, "weights", None)
        if weights is not None:
            assert weights[0].dtype == torch.float32
