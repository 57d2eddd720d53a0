"""Orbax checkpoints in `WORKDIR/checkpoints`: params, optimizer state, step, PRNG and data position.

Items are saved separately (`params`, `opt_state`, `extra`, `meta`) so inference and
export restore only the params. Orbax writes each step to a temporary folder and
renames it when complete, so an interrupted save never looks like a checkpoint.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the project's items."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.imported_path = os.path.join(os.path.abspath(workdir), 'imported')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves `state` (a TrainState) with JSON `meta`; asynchronous unless `wait()` follows."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        extra=ocp.args.StandardSave({'step': state.step, 'rng': state.rng}),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores a TrainState shaped (and sharded) like `target`, and its meta."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target.params)),
        opt_state=ocp.args.StandardRestore(_abstract(target.opt_state)),
        extra=ocp.args.StandardRestore(_abstract({'step': target.step, 'rng': target.rng})),
        meta=ocp.args.JsonRestore()))
    state = target.replace(params=out.params, opt_state=out.opt_state,
                           step=out.extra['step'], rng=out.extra['rng'])
    return state, out.meta

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, dict]:
    """Only the params (no optimizer state) and meta: what inference and export need."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}; train first (mlm-flax train).')
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    return out.params, out.meta

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
