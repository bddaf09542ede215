"""The six-step tuning recipe (docs: domain.md section 1) as checks on a config.

  initial_loss   loss at step 0, regularization off, against ln C (cross-entropy) or C-1 (hinge)
  overfit_small  a few batches, every regularizer and augmentation off, trained to 100%
  lr_range       log-spaced learning rates for ~100 steps each (or one exponential ramp)
  activations    per-layer activation statistics at init and after a few steps
  grad_check     analytic vs centred finite-difference gradients, float64, small instance
  curves         diagnoses of a run's learning curves (lib/diagnostics/curves.py)

Each check returns a `Result`: PASS / WARN / FAIL, one line with the numbers behind it,
the numbers themselves and the PNGs it wrote. Checks that train use the same compiled
step as launch.train (`lib/training/engine.py`), on the same mesh.

This module is the recipe's one entry point; the checks live beside it:
initial_loss_check (1), dynamics (2, 3), activation_check (4), gradcheck (5),
curves_check (6), what they share in checks, and recipe, which runs them and writes
W/diagnose.json.
"""
from lib.diagnostics.activation_check import activation_stats, activations, judge_activations  # noqa: F401
from lib.diagnostics.checks import (FAIL, PASS, WARN, Result, inputs, plain, pyplot,  # noqa: F401
                                    train_steps, with_overrides, worst)
from lib.diagnostics.curves_check import curves  # noqa: F401
from lib.diagnostics.dynamics import lr_range, overfit_small  # noqa: F401
from lib.diagnostics.gradcheck import check_gradient, grad_check, small_instance  # noqa: F401
from lib.diagnostics.initial_loss_check import expected_initial_loss, initial_loss  # noqa: F401
from lib.diagnostics.recipe import CHECKS, NEEDS_CONFIG, run  # noqa: F401
