"""Training: TrainState, optimizer, `train_step`, and the loop `train_and_evaluate(config, workdir)`."""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from mlm_flax import (checkpoint, data, evaluate, flops, inference, parallel, preemption, validation, workdir_lock,
                      writers)
from mlm_flax.data import tokenizer
from mlm_flax.models import make_model
from mlm_flax.objectives import masking
from mlm_flax.objectives import mlm as loss
from mlm_flax.objectives.mlm import make_mask_fn


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key: step s uses fold_in(rng, s), so a resumed run draws the same masks


def make_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear / cosine decay (or constant)."""
  peak, warmup = opt.learning_rate, min(opt.warmup_steps, num_train_steps)
  end = peak * opt.end_learning_rate_factor
  decay_steps = max(num_train_steps - warmup, 1)
  decay = {'linear': optax.linear_schedule(peak, end, decay_steps),
           'cosine': optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_learning_rate_factor),
           'constant': optax.constant_schedule(peak)}
  if opt.schedule not in decay:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; use one of {sorted(decay)}")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay[opt.schedule]], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on biases and LayerNorm (1-D params)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity(),
      optax.adamw(make_schedule(opt, num_train_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask))


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation, seq_len: int) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  ids = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(init_rng, ids, jnp.ones_like(ids))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def _micro_batches(tree: Any, n: int) -> Any:
  """[batch, ...] leaves → [n, batch // n, ...]; micro-batch j takes rows j, j + n, ..., so every
  device's contiguous shard of the batch holds an equal part of each micro-batch."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def _loss_sum_and_grads(params, model, batch, masked: masking.Masked, num_predictions: int, dropout_rng,
                        grad_accum_steps: int):
  """Summed metrics and the gradient of the summed loss, over `grad_accum_steps` micro-batches. Dropout draws
  per row from `batch['row_ids']`, so the micro-batches together drop exactly what the full batch does."""
  def sum_loss(p, b, m, rng):
    _, metrics = loss.mlm_loss(p, model, b, m, num_predictions, rng)
    return metrics['loss_sum'], metrics

  grad_fn = jax.grad(sum_loss, has_aux=True)
  if grad_accum_steps == 1:
    grads, metrics = grad_fn(params, batch, masked, dropout_rng)
    return grads, metrics

  def accumulate(carry, xs):  # one dropout key: rows draw by their `row_ids`, as in the full batch
    grads, metrics = grad_fn(params, *xs, dropout_rng)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  micro = (_micro_batches(batch, grad_accum_steps), _micro_batches(masked, grad_accum_steps))
  shapes = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro), dropout_rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
  return grads, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
               mask_fn: loss.MaskFn, num_predictions: int | Callable[[int], int],
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the global batch: mask in-graph, forward, token-weighted CE, AdamW.

  The loss is the mean over the masked tokens of the whole global batch, also when the batch is
  split into `grad_accum_steps` micro-batches (summed gradients, divided by the global count; dropout is
  drawn per global row, so that is the same update with dropout too).
  A step with a non-finite loss, gradient or updated param leaves params and optimizer state as they
  were (in-graph, no host sync); its metrics count only in `skipped_steps`.
  The masking rate may depend on the step (`masking.rate_schedule`); `num_predictions` may be a function of
  the batch's sequence length (sequence-length warm-up: one compiled step per length).
  """
  mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  masked = mask_fn(mask_rng, batch['input_ids'], maskable=batch['segment_ids'] > 0, step=state.step)
  if callable(num_predictions):
    num_predictions = num_predictions(batch['input_ids'].shape[-1])
  batch = {**batch, 'row_ids': jnp.arange(batch['input_ids'].shape[0])}  # global rows: dropout draws by them
  grads, metrics = _loss_sum_and_grads(state.params, model, batch, masked, num_predictions, dropout_rng,
                                       grad_accum_steps)
  grads = jax.tree.map(lambda g: g / jnp.maximum(metrics['count'], 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return apply_if_finite(state, optax.apply_updates(state.params, updates), opt_state, metrics,
                         optax.tree.norm(grads))


def apply_if_finite(state: TrainState, params: Any, opt_state: Any, metrics: dict[str, jax.Array],
                    grad_norm: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """The next state with `params` and `opt_state`, unless the loss (`metrics['loss_sum']`), the gradient norm or
  a new param is non-finite: then params and optimizer state stay as they were (in-graph, no host sync) and the
  step's metrics are zeros but `skipped_steps` = 1. The step counter advances either way."""
  finite = jnp.isfinite(metrics['loss_sum']) & jnp.isfinite(grad_norm) & jax.tree.reduce(
      jnp.logical_and, jax.tree.map(lambda p: jnp.isfinite(p).all(), params))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  metrics['grad_norm'] = jnp.where(finite, grad_norm, 0.0)
  metrics['skipped_steps'] = 1.0 - finite.astype(jnp.float32)
  state = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state))
  return state, metrics


def state_shardings(mesh: jax.sharding.Mesh, state: TrainState) -> TrainState:
  """Params and optimizer state split over the mesh's `fsdp` axis (replicated when it has size 1)."""
  repl = parallel.replicated(mesh)
  return state.replace(step=repl, rng=repl, params=parallel.state_sharding(mesh, state.params),
                       opt_state=parallel.state_sharding(mesh, state.opt_state))


def jit_train_step(model, tx: optax.GradientTransformation, mask_fn: loss.MaskFn,
                   num_predictions: int | Callable[[int], int],
                   mesh: jax.sharding.Mesh, grad_accum_steps: int = 1, state_sharding: Any = None):
  """`train_step` jitted over `mesh`: batch split over all devices, state donated and kept in
  `state_sharding` (default: replicated, i.e. data parallelism; see `state_shardings` for FSDP)."""
  repl = parallel.replicated(mesh)
  state_sharding = repl if state_sharding is None else state_sharding
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, mask_fn=mask_fn, num_predictions=num_predictions,
                        grad_accum_steps=grad_accum_steps),
      in_shardings=(state_sharding, parallel.data_sharding(mesh)), out_shardings=(state_sharding, repl),
      donate_argnums=0)


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
  path = os.path.join(workdir, 'config.json')
  old = validation.saved_config(workdir)
  if old is not None:
    validation.check_config_change(old, config.to_dict(), workdir)  # its warning was printed at start
  write_json(path, config.to_dict())


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` from process 0, atomically (a temporary file renamed): a killed write
  never leaves a half-written file."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(obj, f, indent=2)
    os.replace(path + '.tmp', path)


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
  if not os.path.isfile(os.path.join(src, 'config.json')):
    raise ValueError(f'{where}: {src} is not a workdir (no config.json); pass the --workdir of a finished '
                     '`mlm-flax train` run, optionally as WORKDIR:STEP.')
  with open(os.path.join(src, 'config.json')) as f:
    src_model = json.load(f)['model']
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  theirs = shapes(inference.abstract_params(make_model(ml_collections.ConfigDict(src_model))))
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


def _pending_to_meta(pending: list[dict]) -> dict:
  """Metrics of the steps since the last log, so a resumed run logs exactly what an uninterrupted one does."""
  rows = parallel.fetch(pending)
  return {'pending_metrics': [{k: np.asarray(v).item() for k, v in r.items()} for r in rows],
          'pending_dtypes': {k: np.asarray(v).dtype.name for k, v in rows[0].items()} if rows else {}}


def _pending_from_meta(meta: dict) -> list[dict]:
  dtypes = meta.get('pending_dtypes', {})
  return [{k: np.asarray(v, dtypes[k]) for k, v in r.items()} for r in meta.get('pending_metrics', [])]


def check_finite(metrics: dict, step: int, mode: str) -> None:
  """With optimizer.nonfinite='stop': raises at the first step that was skipped (one host sync)."""
  if mode == 'stop' and float(metrics['skipped_steps']):
    raise FloatingPointError(
        f'non-finite loss or gradient at step {step}; stopped (optimizer.nonfinite=stop) without applying '
        'it, and the last checkpoint is untouched. Lower optimizer.learning_rate, set '
        'optimizer.grad_clip_norm, or use optimizer.nonfinite=skip.')


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
class _Run:
  """Everything the training loop needs, built by `_set_up`."""
  config: ml_collections.ConfigDict  # resolved: vocab size and pad id from the tokenizer
  tok: Any
  splits: dict[str, Any]
  eval_rows: dict[str, np.ndarray]
  model: Any
  state: TrainState
  start_step: int
  pending: list[dict]  # metrics of the steps since the last log (a resumed run's come from the checkpoint)
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted over the mesh
  batches: Any  # (global batch, data position) per step, prepared on a background thread
  evaluator: evaluate.Evaluator
  writer: writers.MetricWriter
  ckpt: checkpoint.Checkpointer
  schedule: optax.Schedule
  phases: list[tuple[int, int, int]]  # (first step, batch size, sequence length): warm-ups, then the full shape
  flops_per_token: float
  peak_flops: float


def _set_up(config: ml_collections.ConfigDict, workdir: str, on_exit: contextlib.ExitStack) -> _Run:
  """Data, tokenizer, resolved config, model, optimizer, state (fresh, imported or resumed), jitted step,
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
  model = make_model(config.model)
  tx = make_optimizer(config.optimizer, config.num_train_steps)
  mask_fn, num_predictions = make_mask_fn(config, tok)

  init = functools.partial(create_train_state, model=model, tx=tx, seq_len=config.max_seq_length)
  shardings = state_shardings(mesh, jax.eval_shape(init, jax.random.PRNGKey(config.seed)))
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  pending, meta = [], {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    pending = _pending_from_meta(meta)
    print(f'Resumed from {ckpt.directory} at step {int(state.step)}.')
  elif config.init_from:
    params = warm_start_params(config, state.params)
    state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
  elif ckpt.has_imported():
    params = ckpt.restore_imported(state.params)
    state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
  start_step = int(state.step)

  warmup = len(data.shape_phases(config)) > 1  # shorter rows first: each length its own prediction budget
  budget = functools.partial(loss.prediction_budget, config) if warmup else num_predictions
  p_train_step = jit_train_step(model, tx, mask_fn, budget, mesh, config.grad_accum_steps, shardings)
  rows = eval_rows if train_rows is None else train_rows
  counts = np.bincount(rows['input_ids'][rows['segment_ids'] > 0], minlength=len(tok))
  counts[list(tokenizer.special_token_ids(tok))] = 0
  baseline = int(counts.argmax())  # the unigram baseline predicts the most frequent training token
  evaluator = evaluate.Evaluator(model, *make_mask_fn(config, tok, 'eval'), mesh, config.seed,
                                 baseline_token=baseline)
  writer = writers.MetricWriter(workdir, resume_step=start_step, config=config.to_dict())

  batches = data.train_iterator(config, splits['train'] if train_rows is None else train_rows, tok, mesh,
                                start_step, meta.get('data_position'),  # prepared on a background thread
                                pack_at=lambda n: pack(splits['train'], max_seq_length=n))
  on_exit.callback(batches.close)
  flops_per_token = flops.config_flops_per_token(config)
  peak, peak_source = flops.peak_flops()
  if jax.process_index() == 0:
    print(f'{flops_per_token / 1e6:.1f} MFLOPs per training token; peak {peak / 1e12:.3g} TFLOP/s '
          f'({peak_source}) for MFU.')
  return _Run(config=config, tok=tok, splits=splits, eval_rows=eval_rows, model=model, state=state,
              start_step=start_step, pending=pending, train_step=p_train_step, batches=batches,
              evaluator=evaluator, writer=writer, ckpt=ckpt,
              schedule=make_schedule(config.optimizer, config.num_train_steps), phases=data.shape_phases(config),
              flops_per_token=flops_per_token,
              peak_flops=peak)


def _log_train(run: _Run, step: int, pending: list[dict], last_time: float, last_step: int, bar: tqdm) -> float:
  """Writes the train row of the steps since `last_step` (their metrics: `pending`) up to `step`; returns the
  time it was measured at."""
  config = run.config
  sums = jax.tree.map(lambda *x: np.sum(x), *parallel.fetch(pending))  # the only sync point
  now = time.time()
  elapsed, steps = now - last_time, step - last_step
  summary = loss.summarize(sums)
  tokens = sum(b * n for b, n in (data.step_shape(run.phases, s) for s in range(last_step, step)))  # warm-ups
  check_finite(sums, step, config.optimizer.nonfinite)
  summary.update(grad_norm=float(sums['grad_norm']) / max(len(pending) - int(sums['skipped_steps']), 1),
                 skipped_steps=int(sums['skipped_steps']),
                 learning_rate=float(run.schedule(step - 1)),
                 tokens_per_second=tokens / elapsed)
  summary['mfu'] = summary['tokens_per_second'] * run.flops_per_token / run.peak_flops
  run.writer.write(step, 'train', summary)
  if summary['skipped_steps'] and jax.process_index() == 0:
    print(f"step {step}: skipped {summary['skipped_steps']} of the last {len(pending)} steps (non-finite "
          'loss or gradient; optimizer.nonfinite=skip)', flush=True)
  bar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['masked_accuracy']:.3f}",
                  tok_s=f"{summary['tokens_per_second']:.0f}", mfu=f"{summary['mfu']:.0%}")
  if bar.disable and jax.process_index() == 0:  # no bar (logs, notebooks): one line per log step
    eta = (config.num_train_steps - step) * elapsed / steps
    print(f"step {step}/{config.num_train_steps}: loss {summary['loss']:.4f} masked_accuracy "
          f"{summary['masked_accuracy']:.4f} {summary['tokens_per_second']:.0f} tokens/s "
          f"MFU {summary['mfu']:.1%} ETA {eta:.0f}s",
          flush=True)
  return now


def _show_fill_mask(run: _Run, params: Any) -> None:
  """Fill-mask on a few held-out sentences, printed (process 0)."""
  mlm = inference.MLM(config=run.config, params=params, tokenizer=run.tok, model=run.model)
  print('Fill-mask on held-out sentences:')
  for text, answer in inference.held_out_examples(run.splits['validation']['text'], run.tok,
                                                  run.config.fill_mask_examples):
    preds = inference.fill_mask(mlm, text, top_k=5)
    print(f'  {text}  (held-out word: {answer})\n    -> '
          + ', '.join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preempt: preemption.Watcher,
                        on_exit: contextlib.ExitStack) -> dict:
  run = _set_up(config, workdir, on_exit)
  config, state, pending, ckpt = run.config, run.state, run.pending, run.ckpt

  def run_eval(step: int, log: bool = True) -> dict:
    result = run.evaluator(state.params, run.eval_rows, config.eval_batch_size, config.max_eval_batches)
    if log:
      run.writer.write(step, 'eval', result)
    return {'step': step, **result}

  last_time, last_step, result = time.time(), run.start_step, None
  bar = tqdm(total=config.num_train_steps, initial=run.start_step, unit='step', dynamic_ncols=True,
             disable=not config.progress_bar or jax.process_index() != 0)
  for step in range(run.start_step + 1, config.num_train_steps + 1):
    batch, data_position = next(run.batches)
    state, metrics = run.train_step(state, batch)
    pending.append(metrics)
    if len(pending) > 1:  # keep one step queued, so the bar and ETA follow real progress
      jax.block_until_ready(pending[-2]['count'])
      check_finite(pending[-2], step - 1, config.optimizer.nonfinite)
    bar.update(1)
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      now = _log_train(run, step, pending, last_time, last_step, bar)
      pending, last_time, last_step = [], now, step
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      result = run_eval(step)
      bar.write(f"step {step}: eval loss {result['loss']:.4f} masked_accuracy "
                f"{result['masked_accuracy']:.4f} (unigram baseline {result['unigram_baseline_accuracy']:.4f})")
      last_time = time.time()  # eval time is not training throughput
      if step == config.num_train_steps:  # before the last checkpoint: a finished run always has its HParams
        run.writer.write_hparams(config.to_dict(), result)
    stop = preempt.should_stop(step) and step < config.num_train_steps
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps or stop:
      if pending:
        check_finite(pending[-1], step, config.optimizer.nonfinite)  # never checkpoint past a bad step
      ckpt.save(step, state, {'step': step, 'data_position': data.checkpoint_position(data_position),
                              **_pending_to_meta(pending)}, force=stop)
    if stop:
      ckpt.wait()
      ckpt.close()
      run.writer.close()
      bar.close()
      print(f'Preempted at step {step}; checkpoint saved in {ckpt.directory}; run the same command to resume.',
            flush=True)
      return {'step': step, 'preempted': True}
  bar.close()
  if result is None:  # nothing left to train: report, but do not log the same eval twice
    result = run_eval(run.start_step, log=False)
    run.writer.write_hparams(config.to_dict(), result)
  ckpt.wait()
  ckpt.close()
  run.writer.close()
  if config.fill_mask_examples and jax.process_index() == 0:
    _show_fill_mask(run, state.params)
  return result
