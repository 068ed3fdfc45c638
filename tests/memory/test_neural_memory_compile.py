"""`NeuralMemoryConfig.compile`: the `dual` chunk loop through ``torch.compile`` equals the eager one.

Inductor compiles C++ with the system compiler on first use (tens of seconds per graph on a loaded CPU; its
cache makes later runs fast), so one small case covers both graphs: the forward without autograd (the plain
chunk step) and the forward+backward (`DualStep` and its hand-written backward, traced by dynamo).
"""

import pytest
import torch
from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig

# float64 end to end: inductor's fused kernels only reorder float rounding
TOL = 1e-10


def pair(**overrides) -> tuple[NeuralMemory, NeuralMemory]:
    options = dict(
        dim=8, heads=2, head_dim=4, depth=2, chunk_size=3, theta_max=0.5, eta_bias=0.0, alpha_bias=-1.0
    )
    options.update(overrides)
    layers = []
    for compile in (False, True):
        torch.manual_seed(0)
        layers.append(NeuralMemory(NeuralMemoryConfig(**options, compile=compile)).double())
    return layers[0], layers[1]


def test_the_compiled_dual_kernel_equals_the_eager_one():
    eager, compiled = pair()
    # 7 tokens: two chunks of 3 and one pending token (read, not committed)
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (y_eager, s_eager), (y_compiled, s_compiled) = eager(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager, atol=TOL, rtol=0)
    for a, b in zip(s_compiled.weights + s_compiled.momentum, s_eager.weights + s_eager.momentum):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)

    grads = []
    for layer in (eager, compiled):
        y, state = layer(x)
        (y.square().sum() + sum(w.sum() for w in state.weights + state.momentum)).backward()
        grads.append({name: p.grad for name, p in layer.named_parameters()})
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=TOL, rtol=0, msg=name)


def test_compile_needs_the_dual_kernel_and_leaves_the_state_fingerprint_alone():
    with pytest.raises(ValueError, match="compile needs update='dual'"):
        NeuralMemoryConfig(update="scan", compile=True)
    assert NeuralMemoryConfig(compile=True).fingerprint() == NeuralMemoryConfig().fingerprint()
