"""Preemption: SIGTERM / SIGINT ask the training loop to stop after the current step.

The loop checks `Watcher.should_stop(step)` after each step; when it says so, the loop saves
a checkpoint at that step, waits for it to be finalised and returns, so the same command
resumes exactly there. A second SIGINT falls back to the previous handler (Ctrl-C twice
interrupts at once). With several processes, JAX's preemption sync point makes every host
agree on the step to stop at (the signal reaches hosts at different times).
"""

import contextlib
import logging
import signal
import threading
from typing import Iterator

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Watcher:
  """Records SIGTERM/SIGINT in a flag instead of dying mid-step."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    if self.signum == signum == signal.SIGINT:  # asked twice: stop now
      previous = self._previous.get(signum, signal.default_int_handler)
      signal.signal(signum, previous)
      if callable(previous):
        previous(signum, frame)
      return
    self.signum = signum
    print(f'Received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint.',
          flush=True)

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM/SIGINT will not save a checkpoint before exiting.')
      return
    if jax.process_count() > 1:  # JAX's preemption service handles SIGTERM and syncs the step
      return
    for s in SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)

  def uninstall(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True when a signal arrived (single process) or every host reached the preemption sync point."""
    if self.signum is not None:
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service not enabled
        return False
    return False


@contextlib.contextmanager
def watch() -> Iterator[Watcher]:
  """Installs the handlers for the duration of the block, restores the previous ones after."""
  watcher = Watcher()
  watcher.install()
  try:
    yield watcher
  finally:
    watcher.uninstall()
