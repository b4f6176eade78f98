"""Distillation methods, one module each, found by name (no hand-kept list).

    module = methods.get("meanflow")       # imports diffdistill.methods.meanflow
    methods.names()                        # every public module of this package

A method module declares, in one place, everything about its method outside the loss math
(which stays in `diffdistill/losses/`):

    CONFIG    {section: {key: default}}: its config sections (its own, e.g. "cd", and shared
              ones it reads, e.g. "consistency"); a runner adds them to its config
    SETTINGS  {"dotted.key": value}: what it requires of the rest of the config (the teacher's
              schedule, the student's output kind, ...); `build` re-checks them with a clear error
    TESTBEDS  {testbed: {"dotted.key": value}} overrides per testbed, or a str: why the method
              does not run on that testbed
    TINY      {"dotted.key": value}: the smoke-test size (`,tiny`); QUICK likewise (`,quick`)
    FULL      (optional) {testbed: {"dotted.key": value}}: the steps (and settings) at which the
              method reaches its paper's strength on that testbed, where that takes longer than
              the testbed's budget (`,full`); each entry cites its measured result
    EXTRA_COND  the student network's extra scalar inputs (MeanFlow's r, shortcut's d, CTM's s)
    CONDITIONAL  (optional, default False) True when its losses read batch["label"] and pass it
              to the teacher and the student, and its sampler passes **cond on: it can distil a
              class-conditional teacher over all its labels (experiments: teacher.conditional)
    build(config, setup) -> plan.Plan   its stages (players, how each starts, EMAs, frozen
              inputs, data) and its students
    sampler(net, *, t_start, t_end, **options) -> sample(params, x_T, *, nfe, rng=None, **cond)
              its student's few-step sampler (`plan` module docstring); None for a method whose
              samples need no sampler (SDS / VSD particles)

`setup` is the runner's view of the teacher and data: `.config`, `.teacher` (apply, params,
schedule, example_shape, and module / kind / mixture / num_classes where known), `.t_start`,
`.t_end`, `.data(seed, batch_size=None)`, `.start_noise(rng, n)` and
`.teacher_sampler(solver, nfe, **kw)` (experiments/distill/setup.py is one). docs/methods.md
shows how to add a method.
"""

from __future__ import annotations

import importlib
import pkgutil
import types


def names() -> tuple[str, ...]:
  """The registered methods: every module of this package whose name has no leading '_'
  and that defines `build` (plan.py and other helpers are not methods)."""
  out = []
  for info in pkgutil.iter_modules(__path__):
    if info.name.startswith("_") or info.ispkg:
      continue
    if hasattr(importlib.import_module(f"{__name__}.{info.name}"), "build"):
      out.append(info.name)
  return tuple(sorted(out))


def get(name: str) -> types.ModuleType:
  """The method module `diffdistill.methods.<name>`; ValueError naming the known methods."""
  if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
    raise ValueError(f"Unknown method {name!r}; expected one of {names()}.")
  try:
    module = importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise ValueError(f"Unknown method {name!r}; expected one of {names()}.") from None
  if not hasattr(module, "build"):
    raise ValueError(f"Unknown method {name!r}; expected one of {names()}.")
  return module


__all__ = ["get", "names"]
