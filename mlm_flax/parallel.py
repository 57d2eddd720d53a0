"""Meshes, shardings and multi-host set-up: the layer around the pure step functions.

Steps are written for the global batch; `jax.jit` with these shardings splits the
batch over the `data` axis and inserts the gradient all-reduce, so a step gives
the same result (masks and dropout included: threefry is partitionable) on one
device or a pod.
"""

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


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


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data-parallel mesh over all (or the first `num_devices`) devices."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str = 'batch_size') -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(f'{key}={global_batch_size} must be divisible by the {n} devices of the data '
                     f'axis and the {jax.process_count()} processes; use a multiple of {n}.')


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
