"""Test set-up: 8 simulated CPU devices (set before JAX starts), a compile-light XLA, a
compilation cache shared by the session's workers, and a local float64 switch.

Every test runs on CPU in float32 unless it asks for `x64`, which enables float64 only for
its own duration (never globally).

Most tests are compile-bound (a tiny model, a few steps: a distill smoke run spends 20 of its 24
s in XLA's compiler). So the suite
- runs XLA:CPU's backend at optimization level 0 (`XLA_FLAGS` below): the same HLO programs,
  without LLVM's optimization passes, to the same tolerances;
- shares one persistent compilation cache between the xdist workers of a session (a fresh
  directory made by the controller, removed at its end: nothing carries over between runs), so
  a program compiled by one test or worker is loaded by the next.
Measured on the idle 2-core machine (2026-12-06, 623 tests, `-n 2`): 389 s before; 290 s with
both (user time 739 -> 545 s). Set XLA_FLAGS or JAX_COMPILATION_CACHE_DIR yourself to opt out.
"""

import atexit
import gc
import os
import shutil
import tempfile

if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # the controller (or a run without xdist): the workers inherit the variables
  _cache = tempfile.mkdtemp(prefix="diffdistill-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Enables float64 inside one test."""
  with jax.enable_x64(True):
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """Finishes JAX's clean-up while an xdist worker still counts as running.

  Why: once the last worker reports that it has finished, the controller gives each worker 5 s
  to return and then sends it SIGINT (execnet's `_terminate_execution`). After reporting, a
  worker still runs pytest's clean-up, which calls `gc.collect()` several times, and every
  collection runs JAX's garbage-collector callback (`_xla_gc_callback`). Measured on the loaded
  2-core machine: 4 full collections of ~1-2 s each, 8.5 s in all, so the SIGINT landed inside
  the callback and Python printed "Exception ignored in: <function _xla_gc_callback> ...
  KeyboardInterrupt" after a passing run. Here, before xdist's own `pytest_sessionfinish`
  wrapper reports the worker finished, JAX's caches are freed and collected once, the survivors
  are frozen out of later collections (`gc.freeze`), and JAX's callback (nothing is left for it
  to free) is unregistered: the later collections take ~0.01 s each and none can be interrupted
  inside JAX. Harmless without xdist (the session is over).
  """
  del session
  jax.clear_caches()
  gc.collect()
  gc.freeze()
  gc.callbacks[:] = [cb for cb in gc.callbacks
                     if not getattr(cb, "__module__", "").startswith("jax")]


_BUDGET_LIST = os.path.join(os.path.dirname(__file__), "slow_by_budget.txt")


@pytest.hookimpl(tryfirst=True)  # before the `-m` deselection of pytest's mark plugin
def pytest_collection_modifyitems(config, items):
  """Marks `slow` the tests listed in slow_by_budget.txt (why: its header)."""
  del config
  with open(_BUDGET_LIST) as f:
    listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
  for item in items:
    if item.nodeid in listed:
      item.add_marker(pytest.mark.slow)
