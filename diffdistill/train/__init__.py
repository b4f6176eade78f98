"""The training stack: state, optimizers, the sharded step, checkpoints, the loop, writers.

Submodules are imported by name (`from diffdistill.train import step`); this package file exists
so that a regular (non-editable) install ships them.
"""
