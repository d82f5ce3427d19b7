"""Training engine pieces: optimizers (`optim`), learning-rate schedules (`schedules`), GLUE metrics (`metrics`).

Import the submodules directly; `metrics` is numpy-only and does not import MindSpore.
"""
