"""Checks that an installed (non-editable) diffdistill holds every module of the source tree.

    python .ci/check_wheel.py SOURCE_ROOT

Run it with the interpreter of a venv into which the wheel was installed, from a directory outside
the checkout. Every `.py` file under SOURCE_ROOT/diffdistill and SOURCE_ROOT/experiments must be
importable, and must be imported from the installed copy, not from the checkout: a package folder
without `__init__.py` is silently dropped by `find_packages`, and this is what catches it. Modules
that define absl flags at import (experiment entry points: main.py, evaluate.py) clash with each
other in one process, so each of them gets its own subprocess, and so does each experiment package.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys


def source_modules(root: str) -> list[str]:
  names = []
  for top in ("diffdistill", "experiments"):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for f in sorted(filenames):
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3]
          name = rel.replace(os.sep, ".")
          names.append(name[: -len(".__init__")] if name.endswith(".__init__") else name)
  return sorted(names)


def import_all(names: list[str], root: str) -> list[str]:
  """Imports each module; returns the problems (missing, or imported from the checkout)."""
  problems = []
  root = os.path.realpath(root)
  for name in names:
    try:
      module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 (every failure is reported)
      problems.append(f"{name}: {type(e).__name__}: {e}")
      continue
    path = os.path.realpath(getattr(module, "__file__", "") or "")
    if path.startswith(root + os.sep):
      problems.append(f"{name}: imported from the checkout ({path}), not the installed wheel")
  return problems


def main() -> int:
  root = sys.argv[1]
  if len(sys.argv) > 2:  # child: import the given modules
    problems = import_all(sys.argv[2:], root)
    print("\n".join(problems))
    return 1 if problems else 0
  names = source_modules(root)
  groups: dict[str, list[str]] = {}
  for name in names:
    parts = name.split(".")
    if parts[0] != "experiments":
      key = parts[0]
    elif parts[-1] in ("main", "evaluate"):  # entry points: absl flags defined at import
      key = name
    else:
      key = ".".join(parts[:2])
    groups.setdefault(key, []).append(name)
  failed = False
  for key, group in sorted(groups.items()):
    proc = subprocess.run([sys.executable, __file__, root, *group], capture_output=True, text=True)
    if proc.returncode:
      failed = True
      print(f"[{key}]\n{proc.stdout}{proc.stderr[-2000:]}")
  print(f"wheel check: {len(names)} modules in {len(groups)} groups: "
        f"{'FAILED' if failed else 'all imported from the installed wheel'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
