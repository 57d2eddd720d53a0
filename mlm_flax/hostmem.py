"""Host memory for XLA:CPU: keep freed pages for reuse instead of handing them back to the kernel.

XLA:CPU allocates a step's temporary buffers at every execution. With glibc's defaults, large blocks are
mmap-ed and unmapped each step and every XLA worker thread gets its own arena, so each step touches fresh pages:
~50,000 page faults per step of the quick start (2-core Intel Xeon with AMX: 10.1k tokens/s with them, 11.5k
without, `experiments/benchmarks/README.md`). One arena, no mmap and no trimming make a freed block the next
step's block. Trimming is off altogether (`M_TRIM_THRESHOLD=-1`, i.e. SIZE_MAX): at 2 GB, the largest positive
threshold, glibc still handed a BERT-base step's freed buffers back every step (32 x 128: 16 GB given back and
faulted in again over 3 steps, 2x slower). It is process-wide (glibc's `mallopt`), takes effect for threads that
have not allocated yet, so it runs at `import mlm_flax`, before JAX starts its CPU client; `MLM_FLAX_MALLOC=system`
leaves glibc as it is. tcmalloc or jemalloc preloaded (`LD_PRELOAD`) do the same and are left alone.

`mlm_flax.parallel` also has XLA:CPU run each single-device computation in the calling thread (`run_inline`),
so that a step's temporaries are freed before the call returns (see there); `MLM_FLAX_MALLOC=system` leaves that
as it is too.
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def opted_out() -> bool:
  """True when `MLM_FLAX_MALLOC=system`: glibc and JAX's CPU dispatch are left as they are."""
  return os.environ.get('MLM_FLAX_MALLOC', 'reuse') == 'system'


def keep_freed_memory() -> bool:
  """Sets glibc to reuse freed memory (one arena, no mmap-ed blocks, no trim: -1 is SIZE_MAX); True when it did."""
  if (opted_out() or not sys.platform.startswith('linux')
      or any(name in os.environ.get('LD_PRELOAD', '') for name in ('tcmalloc', 'jemalloc'))):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
    return False
  return all(mallopt(option, value) == 1 for option, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
