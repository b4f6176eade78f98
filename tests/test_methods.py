"""The method registry (found by module name) and the one few-step sampler contract, run for
every registered method on a tiny network: shape, finiteness, the exact number of network calls,
determinism without rng."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import methods, nets, schedules

CALLS = []


@dataclasses.dataclass(frozen=True)
class CountingNet(nets.Net):
  """A Net whose raw network records each call it makes at run time (inside jit and scan)."""

  @functools.cached_property
  def apply(self):
    inner = nets.make_apply(self.module)

    def apply(params, x, t, **kw):
      jax.debug.callback(lambda: CALLS.append(1))
      return inner(params, x, t, **kw)

    return apply


def test_methods_are_found_by_module_name():
  names = methods.names()
  assert {"pd", "gpd", "cd", "scd", "meanflow", "shortcut", "ctm", "dmd2", "sid", "sds"} <= set(names)
  assert not {"plan", "_common", "_consistency"} & set(names)
  assert methods.get("meanflow").__name__ == "diffdistill.methods.meanflow"
  for bad in ("nope", "plan", "_common", "../x", 3):
    with pytest.raises(ValueError, match="Unknown method .*expected one of"):
      methods.get(bad)


@pytest.mark.parametrize("name", methods.names())
def test_every_method_declares_its_parts(name):
  m = methods.get(name)
  assert m.CONFIG and all(isinstance(v, dict) for v in m.CONFIG.values())
  for table in (m.SETTINGS, m.TINY):
    assert all(isinstance(k, str) and "." in k for k in table)
  assert all(isinstance(v, (dict, str)) for v in m.TESTBEDS.values())
  for testbed, table in getattr(m, "FULL", {}).items():  # `,full`: a testbed the method runs on
    assert isinstance(m.TESTBEDS.get(testbed, {}), dict) and all("." in k for k in table)
  assert isinstance(m.EXTRA_COND, tuple) and callable(m.build)
  assert m.sampler is None or callable(m.sampler)
  assert m.__doc__ and len(m.__doc__) > 80  # the paper and the loss it uses


GENERATORS = ("diff_instruct", "dmd", "dmd2", "sid", "fdistill")
# methods whose sampler is another's (the same function of _common / _consistency / _distribution
# with another name): behind `slow`, the shared implementation runs in the default suite
SHARED = ("kd", "tract", "ct", "ict", "ect", "diff_instruct", "dmd", "sid", "fdistill")
SAMPLED = [pytest.param(n, marks=pytest.mark.slow) if n in SHARED else n
           for n in methods.names() if methods.get(n).sampler is not None]


def _net(module):
  s = module.SETTINGS
  schedule = schedules.get(s.get("teacher.schedule", "vp_linear"),
                           **dict(s.get("teacher.schedule_kwargs", {})))
  num_classes = s.get("student.kwargs.num_classes", 0)
  mlp = nets.get_network("mlp", features=16, num_blocks=1, emb_dim=16, num_classes=num_classes,
                         extra_cond=module.EXTRA_COND)
  cond = {"label": jnp.zeros((4,), jnp.int32), "w": jnp.full((4,), 2.0)} if num_classes else {}
  return CountingNet(mlp, kind=s.get("student.kind", "v"), schedule=schedule,
                     example_shape=(2,)), cond


@pytest.mark.parametrize("name", SAMPLED)
def test_every_student_sampler_makes_exactly_nfe_calls(name):
  module = methods.get(name)
  net, cond = _net(module)
  schedule = net.schedule
  params = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 2))
  for nfe in (1, 2):
    kw = dict(t_start=float(schedule.t_max))
    kw.update(generator_steps=nfe) if name in GENERATORS else kw.update(t_end=float(schedule.t_min))
    sample = functools.partial(module.sampler(net, **kw), nfe=nfe)
    if nfe == 2:  # jit-able (nfe static); NFE 1 runs eagerly (op by op: no compile to pay)
      sample = jax.jit(sample)
    if name == "boot" and nfe == 2:  # BOOT's student is one call
      with pytest.raises(ValueError, match=r"boot's sampler takes nfe in \(1,\), got 2"):
        sample(params, x, **cond)
      continue
    CALLS.clear()
    out = jax.block_until_ready(sample(params, x, **cond))
    jax.effects_barrier()
    assert len(CALLS) == nfe, (name, nfe, len(CALLS))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out, sample(params, x, **cond))  # deterministic without rng
