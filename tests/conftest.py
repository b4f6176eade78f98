"""Test set-up: 8 simulated CPU devices (set before JAX starts) and a local float64 switch.

Every test runs on CPU in float32 unless it asks for `x64`, which enables float64 only for
its own duration (never globally).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Enables float64 inside one test."""
  with jax.enable_x64(True):
    yield
