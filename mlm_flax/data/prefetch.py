"""Background batch preparation: a daemon thread fills a bounded queue, so data never stalls the step.

`Prefetcher(source, transform, size)` iterates `transform(item)` for each `item` of
`source`, computed up to `size` items ahead on a daemon thread (the train loop uses
it to read, pack and place batches on the devices while the previous step runs).
An exception raised in the thread is re-raised in the consumer at that item;
`close()` (or leaving a `with` block) stops the thread.
"""

import queue
import threading
from typing import Any, Callable, Iterable


class Prefetcher:
  """An iterator over `transform(item) for item in source`, `size` items ahead (0: no thread)."""

  def __init__(self, source: Iterable[Any], transform: Callable[[Any], Any] = lambda x: x, size: int = 2):
    self._source, self._transform = iter(source), transform
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._error: BaseException | None = None
    self._thread = None
    if size > 0:
      self._thread = threading.Thread(target=self._run, name='mlm_flax-prefetch', daemon=True)
      self._thread.start()

  def _run(self) -> None:
    try:
      for item in self._source:
        if not self._put((True, self._transform(item))):
          return
      self._put((False, StopIteration()))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      self._put((False, e))

  def _put(self, entry) -> bool:
    while not self._stop.is_set():  # time out regularly so that close() is always heard
      try:
        self._queue.put(entry, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self) -> Any:
    if self._error is not None:
      raise self._error
    if self._thread is None:
      return self._transform(next(self._source))
    ok, value = self._queue.get()
    if not ok:
      self._error = value
      raise value
    return value

  def close(self) -> None:
    """Stops the thread (it finishes the item in progress) and waits briefly for it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def __enter__(self) -> 'Prefetcher':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
