"""Which `every_k_schedule` each `AccumulateState` of a state was built with.

`init` has the schedule in hand and the state does not (a schedule is a
function). `restore_checkpoint` runs `tx.init` while recording, and gets the
schedules in the order the states appear in the pytree (each `init` records
before it builds its inner optimizer's state).
"""

import contextlib

_recording = []


def record(schedule):
  """Called by `accumulate`'s init with its normalized schedule."""
  if _recording:
    _recording[-1].append(schedule)


@contextlib.contextmanager
def recording():
  """Collects the schedules recorded by every `init` run in the block."""
  _recording.append([])
  try:
    yield _recording[-1]
  finally:
    _recording.pop()
