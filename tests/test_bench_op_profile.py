"""benchmarks.harness op profiles: XLA thunks mapped to what they compute, torch ops to the same kinds."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import harness


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_xla_op_profile_names_convolutions_and_their_gradients():
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))
    grad = jax.jit(jax.grad(lambda x, w: (_conv(x, w) ** 2).sum(), argnums=(0, 1)))
    prof = harness.xla_op_profile(grad, x, w, iters=1)
    assert prof["wall_ms"] > 0 and prof["top"]
    assert {"conv fwd", "conv bwd-filter"} <= set(prof["kinds"]) | {k for _, k, _ in prof["top"]}
    assert set(prof["kinds"]) <= set(harness.OP_KINDS)


def test_torch_op_profile_and_table():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.ones(2, 4, 8, 8)
    prof = harness.torch_op_profile(lambda: conv(x).sum().backward(), iters=1)
    assert prof["kinds"].get("conv fwd", 0) > 0 and prof["kinds"].get("conv bwd", 0) > 0
    table = harness.format_op_profiles("demo", {"kinds": {"conv fwd": 1.0}, "wall_ms": 1.0, "top": []}, prof)
    assert "| conv fwd | 1.0 |" in table and np.isfinite(prof["wall_ms"])
