"""Optax optimizers from a config section.

    optim:
      name: "adam" | "adamw" | "radam"
      learning_rate: peak learning rate
      b1, b2, eps: Adam moments (defaults 0.9, 0.999, 1e-8)
      weight_decay: decoupled weight decay, adamw only (default 0)
      warmup_steps: linear warm-up from 0 to the peak (default 0), capped at a quarter of the
                    run (num_steps // 4) so that a short run of a long config (an override
                    like --config.num_steps=80) stays valid; the cap is logged
      schedule: "constant" | "cosine" (cosine decays from the peak, after warm-up, to
                end_factor * peak at step decay_steps; default constant)
      decay_steps: end of the cosine decay (default: the run's num_steps)
      end_factor: final learning rate as a fraction of the peak (default 0)
      grad_clip: clip gradients to this global norm first; 0 turns clipping off (default 0)
      accumulation_steps: micro-batches per step, consumed by `train.step` (default 1)

Gradient accumulation is not done here (no `optax.MultiSteps`): `train.step` scans over
micro-batches inside one step and applies one optimizer update to their mean gradient. That keeps
one call = one update = one EMA update = one step of the state, so the step counter, the EMA, the
non-finite guard, the learning-rate schedule and the data position all count the same thing;
with MultiSteps every micro-batch would be a step, and the EMA would move on steps where the
params did not.

References:
  Kingma & Ba, Adam, 2015; Loshchilov & Hutter, AdamW (decoupled weight decay), 2019 and SGDR
  (cosine schedule), 2017; Liu et al., RAdam, 2020; Goyal et al., 2017 (linear warm-up).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import optax

OPTIMIZERS = ("adam", "adamw", "radam")
SCHEDULES = ("constant", "cosine")


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
  value = config.get(key, default)
  return default if value is None else value


def validate(config: Mapping[str, Any]) -> None:
  """Raises ValueError for an optimizer section that `make_optimizer` would reject."""
  name = _get(config, "name", None)
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}.")
  schedule = _get(config, "schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}.")
  if not _get(config, "learning_rate", 0.0) > 0:
    raise ValueError(f"optim.learning_rate must be > 0, got {config.get('learning_rate')!r}.")
  if _get(config, "weight_decay", 0.0) and name != "adamw":
    raise ValueError(f"optim.weight_decay is only used by adamw, got it with {name!r}.")
  for key in ("warmup_steps", "grad_clip"):
    if _get(config, key, 0) < 0:
      raise ValueError(f"optim.{key} must be >= 0, got {config.get(key)!r}.")
  if int(_get(config, "accumulation_steps", 1)) < 1:
    raise ValueError(f"optim.accumulation_steps must be >= 1, got {config.get('accumulation_steps')!r}.")


def warmup_steps(config: Mapping[str, Any], *, num_steps: int) -> int:
  """The warm-up actually used: optim.warmup_steps, at most num_steps // 4."""
  asked = int(_get(config, "warmup_steps", 0))
  used = min(asked, max(int(num_steps), 0) // 4)
  if used < asked:
    logging.warning("optim.warmup_steps=%d capped at %d, a quarter of the run's %d steps.", asked,
                    used, num_steps)
  return used


def learning_rate_schedule(config: Mapping[str, Any], *, num_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then constant or cosine decay to end_factor * peak."""
  validate(config)
  peak = float(config["learning_rate"])
  warmup = warmup_steps(config, num_steps=num_steps)
  if _get(config, "schedule", "constant") == "constant":
    after = optax.constant_schedule(peak)
  else:
    decay_steps = int(_get(config, "decay_steps", num_steps)) - warmup
    if decay_steps <= 0:
      raise ValueError(f"optim.decay_steps ({_get(config, 'decay_steps', num_steps)}) must exceed "
                       f"optim.warmup_steps ({warmup}).")
    after = optax.cosine_decay_schedule(peak, decay_steps,
                                        alpha=float(_get(config, "end_factor", 0.0)))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: Mapping[str, Any], *, num_steps: int) -> optax.GradientTransformation:
  """The optimizer of a config section (see the module docstring); clipping comes first."""
  validate(config)
  lr = learning_rate_schedule(config, num_steps=num_steps)
  moments = dict(b1=float(_get(config, "b1", 0.9)), b2=float(_get(config, "b2", 0.999)),
                 eps=float(_get(config, "eps", 1e-8)))
  name = config["name"]
  if name == "adam":
    opt = optax.adam(lr, **moments)
  elif name == "adamw":
    opt = optax.adamw(lr, weight_decay=float(_get(config, "weight_decay", 0.0)), **moments)
  else:
    opt = optax.radam(lr, **moments)
  clip = float(_get(config, "grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
