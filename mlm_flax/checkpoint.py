"""Orbax checkpoints in `WORKDIR/checkpoints`: params, optimizer state, step, PRNG and data position.

Items are saved separately (`params`, `opt_state`, `extra`, `meta`) so inference and
export restore only the params. Orbax writes each step to a temporary folder and
renames it when complete (after writing `commit_success.txt` into it), so an
interrupted save never looks like a checkpoint.

Integrity: `meta` records a CRC-32 of every saved array's bytes, per item and leaf
(`{"checksums": {item: {leaf: "crc32:hex"}}}`; computed from the whole global array, so the
same on any mesh; CRC-32 detects every single-bit flip and every burst of up to 32 bits). A
restore that fails, or whose checksums differ (a truncated, missing or flipped-bit data file, a
step folder without its commit marker), warns and falls back to the newest older checkpoint that
restores cleanly. `train` then renames the bad folder aside to `checkpoints/corrupt-<step>-<time>`
(so later saves and retention cannot collide with it); read-only commands leave it in place.
"""

import logging
import os
import shutil
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

COMMIT_MARKER = 'commit_success.txt'  # written by Orbax into every finalised step folder


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def _global_value(x: Any) -> Any:
  """`x` whole on this host's devices (or in host memory), whatever its sharding; every process must call
  it for the same leaves in the same order (arrays split over processes are all-gathered)."""
  if isinstance(x, jax.Array):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      x = x.addressable_data(0) if x.is_fully_replicated else multihost_utils.process_allgather(x, tiled=True)
  return x


def checksum(x: Any) -> str:
  """'crc32:<8 hex digits>' of an array's raw bytes (C order): any single flipped bit changes it."""
  return f'crc32:{zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)):08x}'


def _host_leaves(items: dict[str, Any]) -> dict[str, list[tuple[str, np.ndarray]]]:
  """{item: [(leaf path, the whole global array on the host)]}; every process must call it (see `_global_value`)."""
  out = {}
  for k, tree in items.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    host = jax.device_get([_global_value(x) for _, x in flat])  # one batch of transfers per item
    out[k] = [(jax.tree_util.keystr(p), np.asarray(x)) for (p, _), x in zip(flat, host)]
  return out


def checksums(items: dict[str, Any], host: dict[str, list[tuple[str, np.ndarray]]] | None = None
              ) -> dict[str, dict[str, str]]:
  """{item: {leaf path: checksum}} of the global arrays (or of `host`, their `_host_leaves`): the meta record
  that `verify` checks a restore against."""
  host = _host_leaves(items) if host is None else host
  return {k: {path: checksum(x) for path, x in leaves} for k, leaves in host.items()}


def nonfinite_leaves(host: dict[str, list[tuple[str, np.ndarray]]]) -> list[str]:
  """'item/leaf path' of every floating-point leaf of `_host_leaves` with a NaN or inf."""
  return [f'{k}{path}' for k, leaves in host.items() for path, x in leaves
          if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all()]


def _leaf_bits(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def legacy_fingerprint(tree: Any) -> jax.Array:
  """The uint32 hash that checkpoints recorded before checksums (a position-weighted sum of the bits;
  misses many flips: its weights are even at even positions). Kept only to verify those checkpoints."""
  total = jnp.uint32(0)
  for i, x in enumerate(jax.tree.leaves(tree)):
    bits = _leaf_bits(jnp.asarray(x)).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(2 * i + 1)
    total = total * jnp.uint32(31) + jnp.sum(bits * weights, dtype=jnp.uint32)
  return total


class CorruptCheckpointError(ValueError):
  """A checkpoint whose files are missing, unreadable or do not match their checksums."""


def verify(items: dict[str, Any], meta: dict, path: str = 'the checkpoint') -> None:
  """Checks restored `items` against the checksums in their `meta`; raises CorruptCheckpointError naming
  each item (and its first leaves) that differs. Checkpoints saved with the older `fingerprints` are checked
  with those, ones with neither are trusted as they are."""
  bad = []
  if 'checksums' in meta:
    got = checksums({k: items[k] for k in meta['checksums'] if k in items})
    for k, leaves in got.items():
      diff = [leaf for leaf, c in meta['checksums'][k].items() if leaves.get(leaf) != c]
      if diff:
        bad.append(f"{k} ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})")
  elif 'fingerprints' in meta:
    bad = [k for k in items if k in meta['fingerprints']
           and int(legacy_fingerprint(items[k])) != meta['fingerprints'][k]]
  if bad:
    raise CorruptCheckpointError(f'{path} does not match its checksums: {"; ".join(bad)}; '
                                 'a data file changed after it was written')


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the project's items."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.imported_path = os.path.join(os.path.abspath(workdir), 'imported')
    self._saving = None  # the step of the last save started, for error messages
    self._closed = False
    if create and os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise NotADirectoryError(f'{self.directory} is a file, not a folder; move it away so checkpoints '
                               'can be written there.')
    if create and jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):  # saves cut short by a crash: never finalised, never used
        if '.orbax-checkpoint-tmp' in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _save_error(self, step: int | None, e: Exception) -> OSError:
    step = self._saving if step is None else step
    good = [s for s in self.manager.all_steps() if s != step]
    last = f'step {max(good)}' if good else 'none'
    return OSError(f'could not save the checkpoint of step {step} in {self.directory} ({type(e).__name__}: {e}). '
                   f'Free disk space and make {self.directory} a writable folder, then run the same '
                   f'command again; earlier checkpoints are kept (last good one: {last}).')

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves `state` (a TrainState) with JSON `meta`; asynchronous unless `wait()` follows.

    A failed save raises `OSError` naming the folder; Orbax deletes old checkpoints (retention)
    only after a save is finalised, so the last good one is never lost to a failed save. A state with a NaN
    or inf (the train step skips steps whose loss or gradient is not finite, not the rare finite step that
    overflows a param) raises `FloatingPointError` before anything is written.
    """
    items = {'params': state.params, 'opt_state': state.opt_state,
             'extra': {'step': state.step, 'rng': state.rng}}
    host = _host_leaves(items)
    bad = nonfinite_leaves(host)
    if bad:
      raise FloatingPointError(
          f'the state of step {step} has non-finite values ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}); '
          f'not saved, earlier checkpoints in {self.directory} are kept. Lower optimizer.learning_rate or set '
          'optimizer.grad_clip_norm, then resume from the last checkpoint.')
    meta = {**meta, 'checksums': checksums(items, host)}
    self._saving = step
    try:
      return self.manager.save(step, force=force, args=ocp.args.Composite(
          meta=ocp.args.JsonSave(meta), **{k: ocp.args.StandardSave(v) for k, v in items.items()}))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises bare Exception)
      raise self._save_error(step, e) from e

  def _restore_step(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores `targets` (abstract trees) and meta at `step`; raises CorruptCheckpointError."""
    path = os.path.join(self.directory, str(step))
    if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
      raise CorruptCheckpointError(f'{path} was never finalised (no {COMMIT_MARKER})')
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(), **{k: ocp.args.StandardRestore(v) for k, v in targets.items()}))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises bare Exception)
      raise CorruptCheckpointError(f'{path} is unreadable ({type(e).__name__}: '
                                   f'{str(e).split(" See full")[0][:200]})') from e
    items, meta = {k: out[k] for k in targets}, out.meta
    if not isinstance(meta, dict) or 'step' not in meta:
      raise CorruptCheckpointError(f'{path} has no valid meta')
    verify(items, meta, path)
    return items, meta

  def _restore_good(self, targets: dict[str, Any], step: int | None, quarantine: bool
                    ) -> tuple[dict[str, Any], dict]:
    """The newest checkpoint (at or before `step`) that restores cleanly.

    Bad ones are skipped with a warning and, with `quarantine`, renamed aside; nothing is renamed
    unless an older checkpoint does restore (an error that hits every step, such as a model that
    does not match, is raised as it is).
    """
    steps = sorted((s for s in self.manager.all_steps() if step is None or s <= step), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}; train first (mlm-flax train).')
    bad, first_error = [], None
    for s in steps:
      try:
        items, meta = self._restore_step(s, targets)
      except CorruptCheckpointError as e:
        bad.append((s, e))
        first_error = first_error or e
        continue
      for b, e in bad:
        self._report_bad(b, e, quarantine)
      return items, meta
    raise first_error

  def _report_bad(self, step: int, error: Exception, quarantine: bool) -> None:
    path = os.path.join(self.directory, str(step))
    if quarantine and jax.process_index() == 0:
      aside = os.path.join(self.directory, f'corrupt-{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      os.rename(path, aside)
      action = f'renamed it to {aside} (delete it when no longer needed)'
    else:
      action = 'left it in place and skipped it'
    logging.warning('Checkpoint %s is corrupt: %s. Falling back to an older checkpoint; %s.',
                    path, error, action)
    if quarantine:
      self.manager.reload()

  def restore(self, target: Any, step: int | None = None, quarantine: bool = True) -> tuple[Any, dict]:
    """Restores a TrainState shaped (and sharded) like `target`, and its meta, from the newest
    good checkpoint (at or before `step`)."""
    items, meta = self._restore_good(
        {'params': _abstract(target.params), 'opt_state': _abstract(target.opt_state),
         'extra': _abstract({'step': target.step, 'rng': target.rng})}, step, quarantine)
    state = target.replace(params=items['params'], opt_state=items['opt_state'],
                           step=items['extra']['step'], rng=items['extra']['rng'])
    return state, meta

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, dict]:
    """Only the params (no optimizer state) and meta: what inference and export need. Read-only:
    a corrupt checkpoint is skipped, not renamed."""
    items, meta = self._restore_good({'params': abstract_params}, step, quarantine=False)
    return items['params'], meta

  # Weights imported from Hugging Face (`mlm-flax import`): params only, in WORKDIR/imported. `train`
  # starts from them with a fresh optimizer when the workdir has no training checkpoint yet.
  def has_imported(self) -> bool:
    return os.path.isdir(self.imported_path)

  def save_imported(self, params: Any) -> None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(self.imported_path, params)

  def restore_imported(self, target: Any) -> Any:
    """Imported params shaped (and sharded) like `target` (arrays or ShapeDtypeStructs)."""
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.imported_path, _abstract(target))

  def wait(self) -> None:
    """Blocks until pending saves are finalised; a failed one raises `OSError`."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(None, e) from e

  def close(self) -> None:
    """Waits for pending saves and releases the manager; safe to call twice."""
    if not self._closed:
      self._closed = True
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_error(None, e) from e
