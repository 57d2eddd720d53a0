"""Meshes, shardings and multi-host set-up: the layer around the pure step functions.

Steps are written for the global batch; `jax.jit` with these shardings splits the
batch over all devices and inserts the gradient all-reduce, so a step gives the
same result (masks and dropout included: threefry is partitionable) on one
device or a pod. The mesh is (data, fsdp): with fsdp > 1 the params and optimizer
state are split too, and XLA inserts the all-gathers and reduce-scatters (FSDP).
"""

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlm_flax import hostmem

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins a multi-process run when asked to, or when a TPU pod / SLURM job is detected."""
  if coordinator_address or num_processes:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif 'SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()


def run_inline() -> bool:
  """XLA:CPU runs each single-device computation in the calling thread (`jax_cpu_enable_async_dispatch=False`),
  its temporaries freed before the call returns, unless `MLM_FLAX_MALLOC=system` (see `hostmem`). With async
  dispatch a runtime thread freed a step's temporaries some time after its outputs were ready; when the next
  step's buffers came first, the heap grew by a step's temporaries (BERT-base 32 x 128, bf16: 7.7 -> 13.1 -> 18.5
  GB in about one run in four). The loops wait for each step on CPU anyway (`steps_queued`). JAX reads the flag
  when it creates its CPU client: this runs at import, and applies unless JAX ran a computation before. True when
  it set the flag."""
  if hostmem.opted_out():
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


run_inline()


def steps_queued() -> int:
  """How many dispatched steps the loops leave queued behind the running one (training and evaluation).

  1 on GPU and TPU: the host readies the next step while the device runs this one. 0 on CPU, where the host is
  the device: XLA:CPU sets up a queued step's buffers beside the running one's, and one queued step took
  BERT-base (32 x 128, bf16) from 7.4 to 17.6 GB peak and 2.2x slower (page faults), the quick start 5% slower.
  """
  return 0 if jax.default_backend() == 'cpu' else 1


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over all (or the first `num_devices`) devices.

  `fsdp` devices share one copy of the params and optimizer state, each holding a slice (FSDP /
  ZeRO-3: XLA all-gathers a weight where it is used and reduce-scatters its gradient); `fsdp=1` is
  plain data parallelism with replicated state. The batch is split over all devices either way.
  """
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'fsdp={fsdp} must divide the {len(devices)} devices; use a divisor of {len(devices)}.')
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, tree: Any) -> Any:
  """Shardings for params / optimizer state: each array split over `fsdp` along its largest
  dimension that divides evenly, or replicated (scalars, small or indivisible arrays)."""
  n = mesh.shape[FSDP_AXIS]

  def leaf(x):
    dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % n == 0 and x.shape[d] >= n]
    if n == 1 or not dims:
      return replicated(mesh)
    spec = [None] * len(x.shape)
    spec[dims[0]] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(leaf, tree)


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch → global arrays sharded over `data`."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def fetch(tree: Any) -> Any:
  """Device → host numpy (only at log time: a sync point)."""
  return jax.device_get(tree)


def all_processes(flag: bool) -> bool:
  """True iff `flag` is True on every process (all must call it): keeps collective paths in step."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).min())


def allgather_concat(x: np.ndarray) -> np.ndarray:
  """Concatenates every process's `x` (any length along axis 0) in process order, on every process."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(x)))).reshape(-1)
  padded = np.zeros((max(int(sizes.max()), 1),) + x.shape[1:], x.dtype)
  padded[:len(x)] = x
  if x.dtype == np.int64:  # without jax_enable_x64 int64 would be truncated to int32 silently
    if len(x) and (x.max() > np.iinfo(np.int32).max or x.min() < np.iinfo(np.int32).min):
      raise ValueError('allgather_concat: int64 values out of int32 range.')
    padded = padded.astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([gathered[i, :n] for i, n in enumerate(sizes)]).astype(x.dtype)
