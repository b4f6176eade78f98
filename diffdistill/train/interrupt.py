"""Ctrl-C as a request to stop at the next safe point, instead of an exception raised wherever
the main thread happens to be.

    interrupt.defer()          # an entry point, first thing (before the heavy imports)
    ...
    interrupt.check()          # between start-up phases: raises KeyboardInterrupt if requested
    loop.run(...)              # checks before every step; stops as on KeyboardInterrupt

Why: Python's default handler raises KeyboardInterrupt in whatever bytecode runs when SIGINT
arrives. In a garbage-collection callback (jax's `_xla_gc_callback`) it is printed as
"Exception ignored" and lost, so the run goes on to the end with status 0; raised inside jax
compilation, TensorFlow's input pipeline or orbax's save while their native threads still
run, the interpreter's shutdown segfaults (4 of 11 tries of the teacher trainer did). After
`defer()` SIGINT only sets a flag, which the code reads where stopping is safe; a second
Ctrl-C, for a phase that does not reach a check soon (a long compilation), exits at once with
status 130 through `os._exit` (a checkpoint being written then stays in orbax's temporary folder,
which is never read as a step; a metrics line cut short is dropped on resume).

Without `defer()` (library use, tests) `requested()` is False and Ctrl-C behaves as Python's.
"""

from __future__ import annotations

import os
import signal
import threading

_requested = threading.Event()


def _handler(signum, frame):
  del signum, frame  # the signal module's signature
  if _requested.is_set():
    os.write(2, b"\nSecond Ctrl-C: exiting at once.\n")
    os._exit(130)
  _requested.set()
  os.write(2, b"\nCtrl-C: stopping at the next safe point (Ctrl-C again exits at once).\n")


def defer() -> None:
  """From now on SIGINT requests a stop (`requested()`); call from the main thread."""
  _requested.clear()
  signal.signal(signal.SIGINT, _handler)


def restore() -> None:
  """Python's default Ctrl-C behaviour again (KeyboardInterrupt), the request cleared."""
  signal.signal(signal.SIGINT, signal.default_int_handler)
  _requested.clear()


def requested() -> bool:
  """Whether Ctrl-C was pressed since `defer()`."""
  return _requested.is_set()


def check() -> None:
  """Raises KeyboardInterrupt if Ctrl-C was pressed since `defer()`."""
  if _requested.is_set():
    raise KeyboardInterrupt
