"""Pretraining: TrainState, the one `train_step` (any objective), and `train_and_evaluate(config, workdir)`, the
set-up of a pretraining run on the one loop (`loop.run_loop`)."""

import contextlib
import dataclasses
import functools
import os
import shutil
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlm_flax import (checkpoint, data, evaluate, flops, inference, loop, parallel, preemption, validation,
                      workdir_json, workdir_lock, writers)
from mlm_flax.data import tokenizer
from mlm_flax.loop import check_finite

from mlm_flax.objectives import make_objective, objective_module
from mlm_flax.objectives import mlm as loss
from mlm_flax.objectives.mlm import make_mask_fn
from mlm_flax.optim import make_optimizer, make_schedule

__all__ = ['TrainState', 'apply_if_finite', 'check_finite', 'create_train_state', 'jit_step', 'jit_train_step',
           'make_mask_fn', 'make_optimizer', 'make_schedule', 'train_and_evaluate', 'train_step']


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key: step s uses fold_in(rng, s), so a resumed run draws the same masks


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation, seq_len: int) -> TrainState:
  """A fresh state; `model` is an objective (`init_params`) or an MLM linen module."""
  objective = model if hasattr(model, 'init_params') else loss.MLM(model, None, 0)
  init_rng, state_rng = jax.random.split(rng)
  params = objective.init_params(init_rng, seq_len)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def _micro_batches(tree: Any, n: int) -> Any:
  """[batch, ...] leaves → [n, batch // n, ...]; micro-batch j takes rows j, j + n, ..., so every
  device's contiguous shard of the batch holds an equal part of each micro-batch."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def _grads(objective, params: Any, batch: dict, aux: Any, totals: dict, dropout_rng: jax.Array,
           grad_accum_steps: int) -> tuple[Any, dict]:
  """The gradient of the objective's loss and its summed metrics, over `grad_accum_steps` micro-batches (the loss
  is normalised by the whole batch's `totals`, so their gradients sum to the full batch's). Dropout draws per
  row from `batch['row_ids']`, so the micro-batches together drop exactly what the full batch does."""
  grad_fn = jax.grad(functools.partial(objective.loss, totals=totals), has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, aux, rng=dropout_rng)

  def accumulate(carry, xs):  # one dropout key: rows draw by their `row_ids`, as in the full batch
    out = grad_fn(params, *xs, rng=dropout_rng)
    return jax.tree.map(jnp.add, carry, out), None

  micro = (_micro_batches(batch, grad_accum_steps), _micro_batches(aux, grad_accum_steps))
  shapes = jax.eval_shape(lambda b, a: grad_fn(params, b, a, rng=dropout_rng), *jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  return jax.lax.scan(accumulate, zeros, micro)[0]


def train_step(state: TrainState, batch: dict[str, jax.Array], *, objective, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the global batch, for any objective (`mlm_flax.objectives`): prepare in-graph (masks, from
  fold_in(rng, step): fresh every step, the same on resume), loss and gradient, optimizer update.

  The loss is normalised over the whole global batch, also when the batch is split into `grad_accum_steps`
  micro-batches (dropout is drawn per global row, so that is the same update with dropout too).
  A step with a non-finite loss or gradient leaves params and optimizer state as they were (in-graph, no host
  sync); its metrics count only in `skipped_steps`.
  """
  prepare_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  batch = {**batch, 'row_ids': jnp.arange(batch['input_ids'].shape[0])}  # global rows: dropout draws by them
  aux, totals = objective.prepare(prepare_rng, batch, state.step)
  grads, metrics = _grads(objective, state.params, batch, aux, totals, dropout_rng, grad_accum_steps)
  return apply_if_finite(state, grads, metrics, tx)


def apply_if_finite(state: TrainState, grads: Any, metrics: dict[str, jax.Array],
                    tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """The next state, `tx`'s update by `grads` applied, unless the loss (`metrics['loss_sum']`) or the gradient
  norm is non-finite: then params and optimizer state stay as they were (in-graph, no host sync) and the step's
  metrics are zeros but `skipped_steps` = 1. The step counter advances either way.

  The update runs inside the branch `lax.cond` takes, so XLA writes the new params and moments into the
  (donated) state's buffers. Computed before the cond (to test the new params too), the taken branch copied the
  whole state every step: 6% of a ModernBERT-base step on CPU. A finite gradient gives a finite Adam step; a
  param that overflows all the same is refused at the next checkpoint (`Checkpointer.save`)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics['loss_sum']) & jnp.isfinite(grad_norm)

  # The clip (`optim.clip_by_global_norm`) takes the norm computed here rather than summing the squares again.
  extra = {'grad_norm': grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}

  def update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    return optax.apply_updates(state.params, updates), opt_state
  params, opt_state = jax.lax.cond(finite, update, lambda: (state.params, state.opt_state))
  metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  metrics['grad_norm'] = jnp.where(finite, grad_norm, 0.0)
  metrics['skipped_steps'] = 1.0 - finite.astype(jnp.float32)
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return state, metrics


def state_shardings(mesh: jax.sharding.Mesh, state: TrainState) -> TrainState:
  """Params and optimizer state split over the mesh's `fsdp` axis (replicated when it has size 1)."""
  repl = parallel.replicated(mesh)
  return state.replace(step=repl, rng=repl, params=parallel.state_sharding(mesh, state.params),
                       opt_state=parallel.state_sharding(mesh, state.opt_state))


def jit_step(objective, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1,
             state_sharding: Any = None):
  """`train_step` of `objective` jitted over `mesh`: batch split over all devices, state donated and kept in
  `state_sharding` (default: replicated, i.e. data parallelism; see `state_shardings` for FSDP)."""
  repl = parallel.replicated(mesh)
  state_sharding = repl if state_sharding is None else state_sharding
  return jax.jit(functools.partial(train_step, objective=objective, tx=tx, grad_accum_steps=grad_accum_steps),
                 in_shardings=(state_sharding, parallel.data_sharding(mesh)), out_shardings=(state_sharding, repl),
                 donate_argnums=0)


def jit_train_step(model, tx: optax.GradientTransformation, mask_fn: loss.MaskFn,
                   num_predictions: int | Callable[[int], int],
                   mesh: jax.sharding.Mesh, grad_accum_steps: int = 1, state_sharding: Any = None):
  """The MLM `train_step` of `model` (masking by `mask_fn`, `num_predictions` per row) jitted over `mesh`."""
  return jit_step(loss.MLM(model, mask_fn, num_predictions), tx, mesh, grad_accum_steps, state_sharding)


def resolve_config(config: ml_collections.ConfigDict, tok) -> ml_collections.ConfigDict:
  """Fills the keys taken from the tokenizer (vocab size, pad id) and checks the model fits."""
  config = ml_collections.ConfigDict(config.to_dict())
  vocab = len(tok)
  if config.model.vocab_size is None:
    config.model.vocab_size = vocab
  elif config.model.vocab_size < vocab:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer '
                     f'vocabulary ({vocab}); unset it or set it to at least {vocab}.')
  if config.model.pad_token_id is None:
    config.model.pad_token_id = tok.pad_token_id
  validation.validate_config(config, jax.device_count(), jax.process_count())  # positions with the pad id
  return config


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; on resume, first refuses (as `validation.check_resume` did before the data
  was read) a config whose tokenizer-filled keys change the saved run's maths."""
  old = workdir_json.saved_config(workdir)
  if old is not None:
    validation.check_config_change(old, config.to_dict(), workdir)  # its warning was printed at start
  workdir_json.write_config(workdir, config.to_dict())


def _copy_tokenizer(init_from: str, workdir: str) -> None:
  """Copies the `init_from` run's tokenizer into `workdir` (process 0), where `get_tokenizer` finds it."""
  src = os.path.join(validation.parse_init_from(init_from)[0], 'tokenizer')
  dst = os.path.join(workdir, 'tokenizer')
  if jax.process_index() == 0 and os.path.isdir(src) and not os.path.isdir(dst):
    shutil.copytree(src, dst + '.tmp', dirs_exist_ok=True)
    os.replace(dst + '.tmp', dst)


def warm_start_params(config: ml_collections.ConfigDict, target: Any) -> Any:
  """The params of `config.init_from` ('WORKDIR' or 'WORKDIR:STEP': that checkpoint, else the latest; a workdir
  made by `mlm-flax import` gives its imported weights), shaped and sharded like `target`. Refuses, naming
  the first params and the model keys that differ, a checkpoint whose shapes do not fit this model."""
  src, step = validation.parse_init_from(config.init_from)
  where = f'--config.init_from={config.init_from}'
  saved = workdir_json.read_config(src)
  if saved is None:
    raise ValueError(f'{where}: {src} is not a workdir (no config.json); pass the --workdir of a finished '
                     '`mlm-flax train` run, optionally as WORKDIR:STEP.')
  src_config = ml_collections.ConfigDict(saved)
  src_model = src_config.model.to_dict()
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  theirs = shapes(objective_module(src_config).abstract_params(src_config))
  ours = shapes(target)
  bad = [f'{k}: {theirs.get(k, "absent")} there, {ours.get(k, "absent")} here'
         for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
  if bad:
    keys = [f'model.{k}: {v!r} there, {config.model.get(k)!r} here' for k, v in src_model.items()
            if k not in validation.IMPORT_FROM_CONFIG and k in config.model and config.model[k] != v]
    raise ValueError(f'{where}: its params do not fit this model ({"; ".join(bad[:3])}'
                     f'{"; ..." if len(bad) > 3 else ""}); model keys that differ: '
                     f'{", ".join(keys) or "none (another vocabulary?)"}. Use the model settings of {src}/config.json.')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
  ckpt = checkpoint.Checkpointer(src, create=False, async_save=False)
  try:
    steps = ckpt.manager.all_steps()
    if not steps and ckpt.has_imported() and step is None:
      params = ckpt.restore_imported(target)
      print(f'Starting from the weights imported into {src} ({where}; fresh optimizer, step 0).', flush=True)
      return params
    if step is not None and step not in steps:
      raise ValueError(f'{where}: {src} has no checkpoint of step {step} (it has: {sorted(steps) or "none"}); '
                       'pick one of those, or drop :STEP for the latest.')
    params, meta = ckpt.restore_params(abstract, step)
  finally:
    ckpt.close()
  print(f'Starting from the params of {src} at step {meta["step"]} ({where}; fresh optimizer, step 0).', flush=True)
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, checkpoints.

  Holds `WORKDIR/.lock` for the run; SIGTERM/SIGINT save a checkpoint at the current step and return
  `{"step", "preempted": true}`. Returns the final evaluation metrics otherwise.
  """
  config = validation.adopt_imported(config, workdir)  # imported weights: their architecture
  validation.validate_config(config, jax.device_count(), jax.process_count())
  warning = validation.check_resume(config, workdir)
  if warning and jax.process_index() == 0:
    print(warning, flush=True)
  os.makedirs(workdir, exist_ok=True)
  with (workdir_lock.hold(workdir, enabled=jax.process_index() == 0), preemption.watch() as preempt,
        contextlib.ExitStack() as on_exit):
    return _train_and_evaluate(config, workdir, preempt, on_exit)


@dataclasses.dataclass
class _Pretraining(loop.Run):
  """The loop's `Run` of a pretraining run, and what its set-up and final report need besides."""
  config: ml_collections.ConfigDict | None = None  # resolved: vocab size and pad id from the tokenizer
  tok: Any = None
  splits: dict[str, Any] | None = None
  objective: Any = None


def _initial_state(config: ml_collections.ConfigDict, objective, tx: optax.GradientTransformation, mesh,
                   ckpt: checkpoint.Checkpointer) -> tuple[TrainState, Any, dict]:
  """The state to start from (fresh, resumed, warm-started or imported), its shardings and the checkpoint's meta."""
  init = functools.partial(create_train_state, model=objective, tx=tx, seq_len=config.max_seq_length)
  shardings = state_shardings(mesh, jax.eval_shape(init, jax.random.PRNGKey(config.seed)))
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  fresh_opt = lambda params: jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    print(f'Resumed from {ckpt.directory} at step {int(state.step)}.')
    return state, shardings, meta
  if config.init_from:
    params = warm_start_params(config, state.params)
    state = state.replace(params=params, opt_state=fresh_opt(params))
  elif ckpt.has_imported():
    params = ckpt.restore_imported(state.params)
    state = state.replace(params=params, opt_state=fresh_opt(params))
  return state, shardings, {}


def _unigram_baseline(rows: dict[str, np.ndarray], tok) -> int:
  """The most frequent non-special training token: the unigram baseline always predicts it."""
  counts = np.bincount(rows['input_ids'][rows['segment_ids'] > 0], minlength=len(tok))
  counts[list(tokenizer.special_token_ids(tok))] = 0
  return int(counts.argmax())


def _set_up(config: ml_collections.ConfigDict, workdir: str, on_exit: contextlib.ExitStack) -> _Pretraining:
  """Data, tokenizer, resolved config, objective, optimizer, state (fresh, imported or resumed), jitted step,
  evaluator, metric writer and the prefetched batches; what must be released at exit goes on `on_exit`."""
  ckpt = checkpoint.Checkpointer(workdir, config.max_checkpoints_to_keep)
  on_exit.callback(ckpt.close)  # however the run ends, in-flight saves are finalised (or fail loudly)
  if ckpt.latest_step() is None and ckpt.has_imported() and jax.process_index() == 0:
    print(f'Starting from the weights imported into {workdir} (model architecture from the import; '
          f'{", ".join(validation.IMPORT_FROM_CONFIG)} from this config).')
  if config.init_from and ckpt.latest_step() is None and not config.data.tokenizer:
    _copy_tokenizer(config.init_from, workdir)  # the warm start's vocabulary, not one trained anew
  splits = data.load_text_splits(config.data, config.seed)
  tok = tokenizer.get_tokenizer(config.data, lambda: data.tokenizer_texts(splits['train']), workdir,
                                data.fingerprint(splits['train'], config.data), data.cache_dir(config.data))
  config = resolve_config(config, tok)
  _save_config(config, workdir)
  pack = functools.partial(data.packed_rows, tokenizer=tok, max_seq_length=config.max_seq_length,
                           packing=config.data.packing, num_proc=config.data.num_proc,
                           cache=data.cache_dir(config.data))
  train_rows = None if config.data.streaming else pack(splits['train'])  # streaming: packed on the fly
  eval_rows = pack(splits['validation'])

  mesh = parallel.make_mesh(fsdp=config.fsdp)
  objective = make_objective(config, tok)
  if len(data.shape_phases(config)) > 1:  # shorter rows first: each length its own prediction budget
    objective = dataclasses.replace(objective, num_predictions=functools.partial(loss.prediction_budget, config))
  tx = make_optimizer(config.optimizer, config.num_train_steps)
  state, shardings, meta = _initial_state(config, objective, tx, mesh, ckpt)
  start_step = int(state.step)
  baseline = _unigram_baseline(eval_rows if train_rows is None else train_rows, tok)
  eval_objective = dataclasses.replace(make_objective(config, tok, 'eval'), baseline_token=baseline)
  evaluator = evaluate.Evaluator(eval_objective, mesh, config.seed)
  writer = writers.MetricWriter(workdir, resume_step=start_step, config=config.to_dict())
  on_exit.callback(writer.close)
  batches = data.train_iterator(config, splits['train'] if train_rows is None else train_rows, tok, mesh,
                                start_step, meta.get('data_position'),  # prepared on a background thread
                                pack_at=lambda n: pack(splits['train'], max_seq_length=n))
  on_exit.callback(batches.close)
  flops_per_token = flops.config_flops_per_token(config)
  peak, peak_source = flops.peak_flops()
  if jax.process_index() == 0:
    print(f'{flops_per_token / 1e6:.1f} MFLOPs per training token; peak {peak / 1e12:.3g} TFLOP/s '
          f'({peak_source}) for MFU.')
  phases = data.shape_phases(config)
  return _Pretraining(
      state=state, start_step=start_step, num_steps=config.num_train_steps,
      step=jit_step(objective, tx, mesh, config.grad_accum_steps, shardings), batches=batches,
      summarize=objective.summarize,
      evaluate=lambda params: evaluator(params, eval_rows, config.eval_batch_size, config.max_eval_batches),
      schedule=make_schedule(config.optimizer, config.num_train_steps), writer=writer, ckpt=ckpt,
      log_every=config.log_every_steps, eval_every=config.eval_every_steps,
      checkpoint_every=config.checkpoint_every_steps, nonfinite=config.optimizer.nonfinite,
      tokens_per_step=lambda s: int(np.prod(data.step_shape(phases, s))), progress_bar=config.progress_bar,
      hparams=config.to_dict(), pending=loop.pending_from_meta(meta), flops_per_token=flops_per_token,
      peak_flops=peak, checkpoint_meta=lambda position: {'data_position': data.checkpoint_position(position)},
      config=config, tok=tok, splits=splits, objective=objective)


def _show_fill_mask(run: _Pretraining, model: Any, params: Any) -> None:
  """Fill-mask on a few held-out sentences, printed (process 0)."""
  mlm = inference.MLM(config=run.config, params=params, tokenizer=run.tok, model=model)
  print('Fill-mask on held-out sentences:')
  for text, answer in inference.held_out_examples(run.splits['validation']['text'], run.tok,
                                                  run.config.fill_mask_examples):
    preds = inference.fill_mask(mlm, text, top_k=5)
    print(f'  {text}  (held-out word: {answer})\n    -> '
          + ', '.join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preempt: preemption.Watcher,
                        on_exit: contextlib.ExitStack) -> dict:
  run = _set_up(config, workdir, on_exit)
  outcome = loop.run_loop(run, preempt)
  if outcome.preempted:
    return {'step': outcome.step, 'preempted': True}
  result = outcome.result
  if result is None:  # nothing left to train: report, but do not log the same eval twice
    result = {'step': run.start_step, **run.evaluate(outcome.state.params)}
    run.writer.write_hparams(run.config.to_dict(), result)
  else:
    result = {'step': outcome.step, **result}
  mlm = run.objective.mlm_model(outcome.state.params)
  if run.config.fill_mask_examples and mlm is not None and jax.process_index() == 0:
    _show_fill_mask(run, *mlm)
  return result
