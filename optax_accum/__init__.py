"""optax_accum: exact gradient accumulation for Optax and Flax."""

import importlib

from optax_accum._accumulate import accumulate
from optax_accum._apply import apply_gradients
from optax_accum._chain import chain
from optax_accum._checkpoint import reduced_state
from optax_accum._checkpoint import restore_checkpoint
from optax_accum._checkpoint import unreduced_state
from optax_accum._microbatch import microbatched_value_and_grad
from optax_accum._noise import gradient_noise_scale
from optax_accum._plan import MicrobatchPlan
from optax_accum._plan import plan_microbatches
from optax_accum._report import ReductionReport
from optax_accum._report import reduction_report
from optax_accum._state import AccumulateState
from optax_accum._state import has_updated
from optax_accum._vmap import share_counters

__version__ = "0.6.0"


def __getattr__(name: str):
  """``optax_accum.flax`` is imported on first use (it needs flax)."""
  if name == "flax":
    return importlib.import_module("optax_accum.flax")
  raise AttributeError(f"module 'optax_accum' has no attribute {name!r}")


__all__ = (
  "AccumulateState",
  "accumulate",
  "apply_gradients",
  "chain",
  "gradient_noise_scale",
  "has_updated",
  "microbatched_value_and_grad",
  "MicrobatchPlan",
  "plan_microbatches",
  "ReductionReport",
  "reduced_state",
  "reduction_report",
  "restore_checkpoint",
  "share_counters",
  "unreduced_state",
)
