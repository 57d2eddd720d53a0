"""Fine-tuning: `finetune(config, init, workdir)`, a set-up plus a short loop, on the pretraining pieces.

The encoder's params come from `init` (a pretraining workdir or a Hugging Face model, `tasks.model.load_encoder`),
the task head is new (a task model's output layer is reused only for the same labels, `tasks.model.head_for_labels`). Training is pretraining's path: `train.make_optimizer` (AdamW, warmup + decay) with optional
layer-wise LR decay, the same Mesh / jit / FSDP shardings, Orbax checkpoints (`checkpoint.Checkpointer`) with exact
resume (data order a function of (seed, epoch), dropout of (step, global row)), SIGTERM handling, metrics.jsonl and
TensorBoard. It evaluates every epoch on the whole validation split, keeps the best step's params in `DIR/best/`
(apart from the resume checkpoints, so retention never deletes them) and writes `DIR/results.json`:
`{"task", "metrics", "per_seed", "best_step"}` with the best step's validation metrics (and test metrics,
`test_*`, from the best params). `seeds=N` runs seed K in `DIR/seed_K/` and reports the mean and `*_std`.
"""

import contextlib
import functools
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from mlm_flax import checkpoint, parallel, preemption, train, validation, workdir_lock, writers
from mlm_flax import data as data_lib
from mlm_flax.data import tokenizer as tokenizer_lib
from mlm_flax.models import position_offset
from mlm_flax.objectives import tasks as task_loss
from mlm_flax.tasks import data as task_data
from mlm_flax.tasks import metrics as task_metrics

TrainState = train.TrainState  # step, params, opt_state, rng: the pretraining state and its checkpoint items
_NO_PENDING = {'loss_sum': 0.0, 'count': 0.0, 'grad_norm': 0.0, 'steps': 0, 'skipped_steps': 0}  # since the last log


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ValueError naming the first bad key and the fix; needs no data and no model (the CLI fails fast)."""
  task = config.task.type
  if task not in task_data.TASKS:
    raise ValueError(f'--config.task.type={task!r} is not one of {", ".join(task_data.TASKS)}.')
  best = config.metric_for_best
  choices = [m for m in task_metrics.METRICS[task] if m != 'mse']  # higher is better
  if best is not None and best not in choices:
    raise ValueError(f'--config.metric_for_best={best!r} is not a {task} metric to maximise; use one of '
                     f'{", ".join(choices)} (or unset it: {task_metrics.DEFAULT_BEST[task]}).')
  for key in ('seeds', 'num_epochs', 'batch_size', 'eval_batch_size', 'max_seq_length', 'log_every_steps',
              'fsdp', 'max_checkpoints_to_keep', 'data.num_proc', 'num_train_steps', 'eval_every_steps',
              'checkpoint_every_steps'):
    value = _get(config, key)
    if value is not None and value < 1:
      raise ValueError(f'--config.{key}={value} must be at least 1.')
  opt = config.optimizer
  if opt.schedule not in ('linear', 'cosine', 'constant'):
    raise ValueError(f'--config.optimizer.schedule={opt.schedule!r} is not one of linear, cosine, constant.')
  if not 0.0 <= opt.warmup_ratio <= 1.0:
    raise ValueError(f'--config.optimizer.warmup_ratio={opt.warmup_ratio} must be a fraction in [0, 1].')
  if opt.learning_rate < 0 or (opt.warmup_steps or 0) < 0:
    raise ValueError('--config.optimizer.learning_rate and --config.optimizer.warmup_steps must be >= 0.')
  if opt.nonfinite not in ('skip', 'stop'):
    raise ValueError(f'--config.optimizer.nonfinite={opt.nonfinite!r} is not one of skip, stop.')
  if opt.layer_decay is not None and not 0.0 < opt.layer_decay <= 1.0:
    raise ValueError(f'--config.optimizer.layer_decay={opt.layer_decay} must be in (0, 1] (1 or unset: off).')
  if config.model.dtype not in ('auto', 'float32', 'bfloat16'):
    raise ValueError(f'--config.model.dtype={config.model.dtype!r} is not one of auto, float32, bfloat16.')
  for key in ('classifier_dropout', 'model.hidden_dropout', 'model.attention_dropout'):
    value = _get(config, key)
    if value is not None and not 0.0 <= value < 1.0:
      raise ValueError(f'--config.{key}={value} must be a dropout rate in [0, 1).')
  if num_devices % config.fsdp:
    raise ValueError(f'--config.fsdp={config.fsdp} must divide the {num_devices} devices.')
  for key in ('batch_size', 'eval_batch_size'):
    size = config[key]
    if size % num_devices or size % num_processes:
      multiple = math.lcm(num_devices, num_processes)
      raise ValueError(f'{key}={size} must be divisible by the {num_devices} devices and {num_processes} '
                       f'processes; use a multiple of {multiple}.')


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split('.'):
    config = config[part]
  return config


def resolve_config(config: ml_collections.ConfigDict, encoder_model: dict) -> ml_collections.ConfigDict:
  """The run's config: the finetune keys, and `model` = the init model's keys with the finetune ones set."""
  resolved = config.to_dict()
  model = dict(encoder_model)
  model['dtype'] = config.model.dtype
  for key in ('hidden_dropout', 'attention_dropout'):
    if config.model[key] is not None:
      model[key] = config.model[key]
  resolved['model'] = model
  if resolved['classifier_dropout'] is None:
    resolved['classifier_dropout'] = model['hidden_dropout']
  if resolved['metric_for_best'] is None:
    resolved['metric_for_best'] = task_metrics.DEFAULT_BEST[config.task.type]
  resolved = ml_collections.ConfigDict(resolved)
  positions = model['max_position_embeddings'] - position_offset(resolved.model)
  if config.max_seq_length > positions:
    raise ValueError(f'max_seq_length={config.max_seq_length} exceeds the {positions} positions of the init '
                     f'model; set --config.max_seq_length={min(positions, 512)} or lower.')
  return resolved


def layer_scales(params: Any, num_layers: int, decay: float) -> Any:
  """Per-leaf learning-rate factors of layer-wise decay: `decay ** (num_layers + 1 - depth)`, where depth is 0 for
  the embeddings, i + 1 for `layer_i` and num_layers + 1 for the rest (final norm, pooler, task head)."""
  def depth(path) -> int:
    names = [str(getattr(k, 'key', k)) for k in path]
    for name in names:
      if m := re.fullmatch(r'layer_(\d+)', name):
        return int(m.group(1)) + 1
    if names[0] == 'encoder' and any('embedding' in n for n in names):
      return 0
    return num_layers + 1
  return jax.tree_util.tree_map_with_path(lambda p, _: decay ** (num_layers + 1 - depth(p)), params)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, params: Any) -> optax.GradientTransformation:
  """`train.make_optimizer` (AdamW, clipping, warmup then decay) with warmup from `warmup_ratio` when
  `warmup_steps` is unset, then layer-wise LR decay (`optimizer.layer_decay`) as a per-leaf scale of the update."""
  opt = schedule_config(config, num_steps)
  tx = train.make_optimizer(opt, num_steps)
  if opt.layer_decay is None or opt.layer_decay == 1.0:
    return tx
  scales = layer_scales(params, config.model.num_layers, opt.layer_decay)
  return optax.chain(tx, optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates, scales)))


def finetune_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
                  task: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the global batch: the mean task loss (over examples, or scored tokens), AdamW. Dropout draws
  from fold_in(rng, step) per global row, so a resumed run or another mesh drops the same units. A non-finite
  loss, gradient or param leaves the state as it was (`train.apply_if_finite`, counted in `skipped_steps`)."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  row_ids = jnp.arange(batch['input_ids'].shape[0])

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['token_type_ids'],
                         deterministic=False, row_ids=row_ids, rngs={'dropout': dropout_rng})
    sums = task_loss.task_loss(logits, batch['labels'], jnp.ones(row_ids.shape, jnp.float32), task)
    return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return train.apply_if_finite(state, optax.apply_updates(state.params, updates), opt_state, sums,
                               optax.tree.norm(grads))


def eval_step(params: Any, batch: dict[str, jax.Array], *, model, task: str) -> tuple[jax.Array, ...]:
  """Predictions and per-row (loss sum, count) of one eval batch, summed on the host in row order."""
  logits = model.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['token_type_ids'])
  return (task_loss.predictions(logits, task), *task_loss.task_loss_rows(logits, batch['labels'], task))


def evaluate(params: Any, rows: dict[str, np.ndarray], p_eval_step, config: ml_collections.ConfigDict, mesh,
             label_names: list[str] | None, pad_token_id: int) -> dict[str, float]:
  """The task's metrics and loss over every row of a split, once (the last batch padded, weight 0): the same
  numbers for any eval_batch_size and mesh."""
  outputs = [parallel.fetch(p_eval_step(params, parallel.to_global(batch, mesh)))
             for batch in data_lib.eval_batches(rows, config.eval_batch_size, jax.process_index(),
                                                jax.process_count(), pad_token_id=pad_token_id)]
  n = len(rows['input_ids'])
  preds, losses, counts = (np.concatenate(x)[:n] for x in zip(*outputs))  # padding rows dropped
  result = task_metrics.compute(config.task.type, rows['labels'], preds, label_names)
  loss = float(np.sum(losses, dtype=np.float64) / max(np.sum(counts, dtype=np.float64), 1.0))
  return {'loss': loss, **result, 'num_examples': n}


def finetune(config: ml_collections.ConfigDict, init: str | None, workdir: str) -> dict:
  """Fine-tunes `init` (default: config.init) on config's task in `workdir`, resuming what it holds; returns
  results.json's content, or `{"step", "preempted": true}` when stopped by SIGTERM/SIGINT (rerun to resume)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init = os.fspath(init or config.init or '')  # a path object too
  if not config.init:
    raise ValueError('No model to fine-tune: pass --init MODEL (a pretraining workdir, a Hugging Face folder or '
                     'a hub name).')
  validate(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  if config.seeds == 1:
    return _finetune_seed(config, workdir)
  parent = _check_parent(config, workdir)
  runs = []
  for k in range(config.seeds):
    seed_config = ml_collections.ConfigDict({**config.to_dict(), 'seed': config.seed + k, 'seeds': 1})
    result = _finetune_seed(seed_config, os.path.join(workdir, f'seed_{k}'), parent if k == 0 else None)
    if result.get('preempted'):
      return result
    runs.append(result['per_seed'][0])
  results = aggregate(config.task.type, runs)
  train.write_json(os.path.join(workdir, 'results.json'), results)
  return results


def _check_parent(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """A multi-seed folder's config.json (`seeds` may grow) refuses a changed config before anything is written;
  returns {path: content}, written by seed 0 once its own checks (init model, data, its resume) pass."""
  path, new = os.path.join(workdir, 'config.json'), config.to_dict()
  old = validation.saved_config(workdir)
  if old is not None:
    without_seeds = lambda c: {k: v for k, v in c.items() if k != 'seeds'}
    validation.check_config_change(without_seeds(old), without_seeds(new), workdir)
  return {path: new}


def aggregate(task: str, per_seed: list[dict]) -> dict:
  """results.json over seeds: each metric's mean, and its sample standard deviation as `NAME_std`."""
  metrics = {}
  for name in per_seed[0]['metrics']:
    values = np.asarray([r['metrics'][name] for r in per_seed], np.float64)
    metrics[name] = float(values.mean())
    metrics[f'{name}_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {'task': task, 'metrics': metrics, 'per_seed': per_seed,
          'best_step': [r['best_step'] for r in per_seed] if len(per_seed) > 1 else per_seed[0]['best_step']}


def _finetune_seed(config: ml_collections.ConfigDict, workdir: str, parent: dict[str, dict] | None = None) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with (workdir_lock.hold(workdir, enabled=jax.process_index() == 0), preemption.watch() as preempt,
        contextlib.ExitStack() as on_exit):
    return _run(config, workdir, preempt, on_exit, parent or {})


class _Best:
  """The best step's params in `DIR/best/<step>`, apart from the resume checkpoints: retention there never
  touches them. `prune` keeps the best step of the last finished resume checkpoint as well as the current one,
  so a crash never loses the params a resumed run reports; a resumed run prunes what came after its checkpoint
  (saved again, the same values, if they become best again), and the finished run keeps its best step only."""

  def __init__(self, workdir: str):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False))

  def prune(self, keep: set[int | None]) -> None:
    for step in self.manager.all_steps():
      if step not in keep:
        self.manager.delete(step)

  def save(self, step: int, params: Any, metrics: dict) -> None:
    if step not in self.manager.all_steps():
      self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      meta=ocp.args.JsonSave({'step': step, 'metrics': metrics})))

  def restore(self, step: int, like: Any) -> Any:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params']

  def close(self) -> None:
    self.manager.close()


def _run(config: ml_collections.ConfigDict, workdir: str, preempt: preemption.Watcher,
         on_exit: contextlib.ExitStack, first_writes: dict[str, dict]) -> dict:
  """One seed's run; nothing is written to `workdir` (nor `first_writes`, {path: JSON}) before every check passed."""
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  task = config.task.type
  encoder = task_model.load_encoder(config.init, dtype=config.model.dtype)
  tok = encoder.tokenizer
  config = resolve_config(config, encoder.model.to_dict())
  old = validation.saved_config(workdir)
  if old is not None:
    warning = validation.check_config_change(old, config.to_dict(), workdir)
    if warning and jax.process_index() == 0:
      print(warning, flush=True)
  labels_path = os.path.join(workdir, 'labels.json')
  saved_names = None
  if os.path.isfile(labels_path):  # a resumed run keeps its label indices
    with open(labels_path) as f:
      saved_names = json.load(f)['label_names']
  task_rows = task_data.load_task_data(config.data, task, tok, config.max_seq_length, saved_names)
  splits, names = task_rows.splits, task_rows.label_names
  encoder_params = (encoder.params, task_model.head_for_labels(encoder, task, names))
  del encoder
  num_train = len(splits['train']['input_ids'])
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'The train split has {num_train} examples, fewer than one batch of {config.batch_size}; '
                     'lower --config.batch_size or add examples.')
  for path, content in first_writes.items():
    train.write_json(path, content)
  train.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  train.write_json(labels_path, {'task': task, 'num_labels': task_rows.num_labels, 'label_names': names,
                            'columns': task_rows.columns})
  if jax.process_index() == 0 and not os.path.isdir(os.path.join(workdir, 'tokenizer')):
    tokenizer_lib.save_atomic(tok, os.path.join(workdir, 'tokenizer'))
  num_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or eval_every

  mesh = parallel.make_mesh(fsdp=config.fsdp)
  model = task_model.make_task_model(config.model, task, task_rows.num_labels, config.classifier_dropout,
                                     config.task.classifier_pooling)

  def create_state(encoder_params: tuple[Any, dict], rng: jax.Array) -> TrainState:  # jitted: no op-by-op dispatch
    init_rng, state_rng = jax.random.split(rng)
    fresh = task_model.init_task_params(init_rng, model, config.max_seq_length)
    params = task_model.task_params_from_encoder(encoder_params[0], fresh, head=encoder_params[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  abstract_params = jax.eval_shape(lambda r: task_model.init_task_params(r, model, config.max_seq_length), rng)
  tx = make_optimizer(config, num_steps, abstract_params)
  shardings = train.state_shardings(mesh, jax.eval_shape(create_state, encoder_params, rng))
  state = jax.jit(create_state, out_shardings=shardings)(encoder_params, rng)
  del encoder_params

  ckpt = checkpoint.Checkpointer(workdir, config.max_checkpoints_to_keep)
  on_exit.callback(ckpt.close)
  best_ckpt = _Best(workdir)
  on_exit.callback(best_ckpt.close)
  meta = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    print(f'Resumed from {ckpt.directory} at step {int(state.step)}.', flush=True)
  start_step = int(state.step)
  history, best_step = meta.get('history', []), meta.get('best_step')
  pending = {**_NO_PENDING, **meta.get('pending', {})}
  saved_best = best_step  # the best step of the last resume checkpoint: its params stay in best/
  best_ckpt.prune({best_step})  # later ones are a crashed run's, maybe not this run's best

  repl = parallel.replicated(mesh)
  p_train_step = jax.jit(functools.partial(finetune_step, model=model, tx=tx, task=task),
                         in_shardings=(shardings, parallel.data_sharding(mesh)), out_shardings=(shardings, repl),
                         donate_argnums=0)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model, task=task),
                        in_shardings=(shardings.params, parallel.data_sharding(mesh)), out_shardings=repl)
  run_eval = functools.partial(evaluate, p_eval_step=p_eval_step, config=config, mesh=mesh, label_names=names,
                               pad_token_id=tok.pad_token_id or 0)
  writer = writers.MetricWriter(workdir, resume_step=start_step)
  on_exit.callback(writer.close)
  schedule = train.make_schedule(schedule_config(config, num_steps), num_steps)
  batches = data_lib.train_batches(splits['train'], config.batch_size, config.seed, start_step,
                                   jax.process_index(), jax.process_count())
  best_name = config.metric_for_best
  bar = tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
             disable=not config.progress_bar or jax.process_index() != 0)
  on_exit.callback(bar.close)
  step_metrics = []
  for step in range(start_step + 1, num_steps + 1):
    state, metrics = p_train_step(state, parallel.to_global(next(batches), mesh))
    step_metrics.append(metrics)
    bar.update(1)
    if step % config.log_every_steps == 0 or step == num_steps:
      pending = _add_pending(pending, step_metrics, step, config.optimizer.nonfinite)
      step_metrics = []
      row = {'loss': pending['loss_sum'] / max(pending['count'], 1.0),
             'grad_norm': pending['grad_norm'] / max(pending['steps'] - pending['skipped_steps'], 1),
             'skipped_steps': pending['skipped_steps'], 'learning_rate': float(schedule(step - 1)),
             'epoch': step / steps_per_epoch}
      writer.write(step, 'train', row)
      bar.set_postfix(loss=f"{row['loss']:.4f}")
      if row['skipped_steps'] and jax.process_index() == 0:
        bar.write(f"step {step}: skipped {row['skipped_steps']} of the last {pending['steps']} steps (non-finite "
                  'loss or gradient; optimizer.nonfinite=skip)')
      pending = dict(_NO_PENDING)
    if step % eval_every == 0 or step == num_steps:
      result = run_eval(state.params, splits['validation'])
      writer.write(step, 'eval', result)
      history.append({'step': step, 'metrics': result})
      bar.write(f'step {step} (epoch {step / steps_per_epoch:.2f}): validation '
                + ' '.join(f'{k} {v:.4f}' for k, v in result.items() if k != 'num_examples'))
      if best_step is None or result[best_name] > _metrics_at(history, best_step)[best_name]:
        best_step = step
        best_ckpt.save(step, state.params, result)
    stop = preempt.should_stop(step) and step < num_steps
    if step % ckpt_every == 0 or step == num_steps or stop:
      pending = _add_pending(pending, step_metrics, step, config.optimizer.nonfinite)
      step_metrics = []
      ckpt.save(step, state, {'step': step, 'history': history, 'best_step': best_step, 'pending': pending},
                force=stop)  # returns once the previous save is final: its best step may go
      best_ckpt.prune({saved_best, best_step})
      saved_best = best_step
    if stop:
      ckpt.wait()
      print(f'Preempted at step {step}; checkpoint saved in {ckpt.directory}; run the same command to resume.',
            flush=True)
      return {'step': step, 'preempted': True}
  bar.close()
  ckpt.wait()
  best_ckpt.prune({best_step})
  results_metrics = dict(_metrics_at(history, best_step))
  results_metrics.pop('num_examples', None)
  if 'test' in splits and 'labels' in splits['test']:
    best_params = state.params if best_step == num_steps else best_ckpt.restore(best_step, state.params)
    test = run_eval(best_params, splits['test'])
    if start_step < num_steps:  # logged once, after the last step (a rerun of a finished run adds no row)
      writer.write(num_steps, 'test', {**test, 'best_step': best_step})
    results_metrics.update({f'test_{k}': v for k, v in test.items() if k != 'num_examples'})
  results = {'task': task, 'metrics': results_metrics,
             'per_seed': [{'seed': config.seed, 'best_step': best_step, 'metrics': results_metrics}],
             'best_step': best_step}
  train.write_json(os.path.join(workdir, 'results.json'), results)
  return results


def _metrics_at(history: list[dict], step: int) -> dict:
  return next(h['metrics'] for h in history if h['step'] == step)


def _add_pending(pending: dict, step_metrics: list[dict], step: int, nonfinite: str) -> dict:
  """Host sums of the train metrics since the last log (checkpointed, so a resumed run logs the same rows).
  With optimizer.nonfinite='stop', raises at a skipped step (before any checkpoint past it)."""
  out = dict(pending)
  for m in parallel.fetch(step_metrics):
    train.check_finite(m, step, nonfinite)
    out['loss_sum'] = out['loss_sum'] + float(m['loss_sum'])
    out['count'] = out['count'] + float(m['count'])
    out['grad_norm'] = out['grad_norm'] + float(m['grad_norm'])
    out['skipped_steps'] += int(m['skipped_steps'])
    out['steps'] += 1
  return out


def schedule_config(config: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
  """`optimizer` with `warmup_steps` set (from `warmup_ratio` of the run's steps when unset)."""
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  if opt.warmup_steps is None:
    opt.warmup_steps = int(round(opt.warmup_ratio * num_steps))
  return opt
