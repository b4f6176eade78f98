"""Shared by the train_teacher tests: a toy2d_cpu config shrunk to milliseconds per step."""

from experiments.train_teacher import config as config_lib


def tiny(data_dir, **overrides):
  """Config values (dotted keys) of a tiny toy2d run; `overrides` use the same keys."""
  return {"num_steps": 400, "batch_size": 16, "log_every": 1, "checkpoint_every": 50,
          "optim.warmup_steps": 10, "network.kwargs.features": 16,
          "network.kwargs.num_blocks": 1, "network.kwargs.emb_dim": 16,
          "sample_at_end": False, "dataset.num_examples": 1000, "dataset.data_dir": data_dir,
          "dataset.prefetch": 0, "progress": False, "tensorboard": False, **overrides}


def as_flags(values):
  return [f"--config.{k}={v}" for k, v in values.items()]


def as_config(values):
  config = config_lib.get_config("toy2d_cpu")
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
