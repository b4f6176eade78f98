"""losses.combine: the weighted sum of terms, their rngs, routed inputs and prefixed aux."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import losses


def _term(scale):
  """A loss with a random draw and an input: mean((p - target)^2) * scale + u, u ~ U(rng)."""
  def fn(params, batch, rng, *, target):
    u = jax.random.uniform(rng)
    return scale * jnp.mean((params["w"] * batch["x"] - target) ** 2) + u, {"u": u}
  return fn


def test_combined_loss_is_the_weighted_sum_of_terms_with_their_own_rngs_and_inputs():
  a, b = _term(1.0), _term(3.0)
  loss = losses.combine({"a": (a, 1.0), "b": (b, 0.1)},
                        routes={"a": {"target": "teacher"}, "b": {"target": "ema"}})
  params, batch, rng = {"w": jnp.array(2.0)}, {"x": jnp.arange(3.0)}, jax.random.key(0)
  value, aux = loss(params, batch, rng, teacher=jnp.ones(3), ema=jnp.zeros(3))
  va, xa = a(params, batch, jax.random.fold_in(rng, 0), target=jnp.ones(3))
  vb, xb = b(params, batch, jax.random.fold_in(rng, 1), target=jnp.zeros(3))
  np.testing.assert_allclose(value, va + 0.1 * vb, rtol=1e-6)
  assert set(aux) == {"a/u", "a/loss", "b/u", "b/loss", "loss"}
  np.testing.assert_allclose([aux["a/u"], aux["b/loss"], aux["loss"]], [xa["u"], vb, value], rtol=1e-6)
  g = jax.grad(lambda p: loss(p, batch, rng, teacher=jnp.ones(3), ema=jnp.zeros(3))[0])(params)
  ga = jax.grad(lambda p: a(p, batch, rng, target=jnp.ones(3))[0])(params)
  gb = jax.grad(lambda p: b(p, batch, rng, target=jnp.zeros(3))[0])(params)
  np.testing.assert_allclose(g["w"], ga["w"] + 0.1 * gb["w"], rtol=1e-6)
  # jitted, and a sequence route passes a keyword under its own name
  same = losses.combine({"a": (a, 1.0)}, routes={"a": ("target",)})
  np.testing.assert_allclose(jax.jit(same)(params, batch, rng, target=jnp.ones(3))[0], va,
                             rtol=1e-6)


def test_combine_names_what_is_wrong():
  a = _term(1.0)
  with pytest.raises(ValueError, match="non-empty mapping"):
    losses.combine({})
  with pytest.raises(ValueError, match=r"terms\['a'\] must be \(loss_fn, weight: float\)"):
    losses.combine({"a": a})
  with pytest.raises(ValueError, match=r"routes name terms \['c'\]"):
    losses.combine({"a": (a, 1.0)}, routes={"c": ("target",)})
  loss = losses.combine({"a": (a, 1.0)}, routes={"a": ("target",)})
  args = ({"w": jnp.array(1.0)}, {"x": jnp.ones(2)}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"inputs \['other'\] are routed to no term"):
    loss(*args, target=jnp.ones(2), other=1.0)
  with pytest.raises(ValueError, match=r"term 'a' needs inputs \['target'\]"):
    loss(*args)
