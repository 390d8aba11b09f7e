"""CRIS's text-to-pixel dynamic conv (models/cris.py dynamic_conv) against torch's grouped F.conv2d, which
CRIS.pytorch uses: values and both gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxboost.models import cris


def test_dynamic_conv_matches_torch_grouped_conv2d():
    rng = np.random.default_rng(0)
    b, h, w, c, k = 3, 7, 5, 6, 3
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(b, c, k, k)).astype(np.float32)
    cot = rng.normal(size=(b, h, w)).astype(np.float32)

    tx = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tk = torch.tensor(kernel, requires_grad=True)
    ref = torch.nn.functional.conv2d(tx.reshape(1, b * c, h, w), tk, padding=k // 2, groups=b)[0]
    (ref * torch.tensor(cot)).sum().backward()

    out, vjp = jax.vjp(cris.dynamic_conv, jnp.asarray(x), jnp.asarray(kernel))
    gx, gk = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gk), tk.grad.numpy(), rtol=1e-5, atol=1e-5)
