"""CUDA checks of the memory models (skipped without a GPU): bf16-mixed training steps stay finite with
float32 memory state, float32 CUDA outputs match the CPU, and so do the gradients of the `dual` update's
hand-written backward."""

import copy

import pytest
import torch
from timeloom_memory import NeuralMemory, NeuralMemoryConfig, TitansConfig, TitansLM

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


@pytest.mark.parametrize("momentum", [True, False])
def test_cuda_dual_backward_matches_cpu(momentum):
    """No surprise clip, so the update's backward is `DualStep`'s hand-written one (the models above clip)."""
    torch.manual_seed(0)
    cpu = NeuralMemory(NeuralMemoryConfig(dim=32, heads=2, head_dim=16, chunk_size=8, momentum=momentum))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(0))
    for m, inputs in ((cpu, x), (gpu, x.cuda())):
        y, _ = m(inputs)
        y.pow(2).sum().backward()
    for (name, expected), got in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(got.grad.cpu(), expected.grad, atol=2e-3, rtol=2e-3, msg=name)
    gpu.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = gpu(x.cuda())
        y.float().pow(2).sum().backward()  # a backward inside autocast still runs the update in float32
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())
