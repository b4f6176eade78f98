"""torchvision for the equivalence tests, on the CPU build of torch that CI installs.

PyPI ships torchvision for Linux only as a CUDA build. Beside torch's CPU wheel (`pip install
torch==2.13.0`, what `.ci/run` and the README install; the CUDA stack is several GB) its compiled
operators do not load, and `import torchvision` then fails in `torchvision._meta_registrations`,
which registers fake-tensor kernels for those operators ("operator torchvision::nms does not
exist"). The tests need only torchvision's model definitions (pytorch-fid subclasses its
Inception blocks), which are plain Python, so in that case the import is retried without the
fake-tensor registrations. A torchvision that imports normally is returned as it is.
"""

import sys
import types

import pytest


def import_torchvision():
  pytest.importorskip("torch")
  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    import torchvision
  except ImportError:
    pytest.skip("torchvision is not installed (the `torch` extra installs it)")
  return torchvision


def import_diffusers():
  """diffusers, after torchvision has been imported as `import_torchvision` does. diffusers imports
  torchvision itself when it is installed, and on torch's CPU wheel that import fails the same way;
  a diffusers test must not depend on another test of the same worker having imported it first
  (which is how these tests once passed)."""
  try:
    import_torchvision()
  except pytest.skip.Exception:  # no torch or no torchvision: diffusers does not import it
    pass
  return pytest.importorskip("diffusers")
