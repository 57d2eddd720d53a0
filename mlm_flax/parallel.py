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
