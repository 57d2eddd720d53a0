"""One training process per workdir: an exclusive `fcntl.flock` on `WORKDIR/.lock`.

The kernel releases the lock when the process exits, however it exits (SIGKILL included),
so a stale lock file never blocks the next run; the file only records the holder's PID.
"""

import contextlib
import fcntl
import os
from typing import Iterator


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir lock for the block; raises `BlockingIOError` naming the holder if taken."""
  if not enabled:  # e.g. processes other than 0 of a multi-host run
    yield
    return
  path = os.path.join(workdir, '.lock')
  f = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise BlockingIOError(f'{workdir} is in use by another `mlm-flax train` (PID {holder}, lock {path}); '
                            'wait for it to finish, stop it, or use another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'{os.getpid()}\n')
    f.flush()
    yield
  finally:
    f.close()  # releases the lock
