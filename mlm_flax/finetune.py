"""Fine-tuning: `finetune(config, init, workdir)`, the set-up of a fine-tuning run on the one loop (`loop.py`).

The encoder's params come from `init` (a pretraining workdir or a Hugging Face model, `tasks.model.load_encoder`),
the task head is new (a task model's output layer is reused only for the same labels,
`tasks.model.head_for_labels`). Training is pretraining's path: the task loss as an objective
(`objectives.tasks.TaskObjective`) in `train.train_step`, `optim.make_optimizer` (AdamW or StableAdamW, warmup +
decay) with optional layer-wise LR decay, the same Mesh / jit / FSDP shardings, non-finite guard, Orbax checkpoints (`checkpoint.Checkpointer`) with exact
resume (data order a function of (seed, epoch), dropout of (step, global row)), SIGTERM handling, metrics.jsonl and
TensorBoard. It evaluates every epoch on the whole validation split, keeps the best step's params in `DIR/best/`
(apart from the resume checkpoints, so retention never deletes them) and writes `DIR/results.json`:
`{"task", "metrics", "per_seed", "best_step"}` with the best step's validation metrics (and test metrics,
`test_*`, from the best params). `seeds=N` runs seed K in `DIR/seed_K/` and reports the mean and `*_std`.
"""

import contextlib
import functools
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mlm_flax import checkpoint, loop, optim, parallel, preemption, train, validation, workdir_json, workdir_lock, writers
from mlm_flax import data as data_lib
from mlm_flax.data import tokenizer as tokenizer_lib
from mlm_flax.models import position_offset
from mlm_flax.objectives import tasks as task_loss
from mlm_flax.tasks import data as task_data
from mlm_flax.tasks import metrics as task_metrics
from mlm_flax.tasks import qa

TrainState = train.TrainState  # step, params, opt_state, rng: the pretraining state and its checkpoint items


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
              'checkpoint_every_steps', 'task.doc_stride', 'task.max_answer_length', 'task.n_best_size'):
    value = _get(config, key)
    if value is not None and value < 1:
      raise ValueError(f'--config.{key}={value} must be at least 1.')
  opt = config.optimizer
  for key, valid in (('schedule', optim.SCHEDULES), ('type', optim.OPTIMIZERS), ('decay_shape', optim.DECAY_SHAPES)):
    if opt.get(key) is not None and opt[key] not in valid:
      raise ValueError(f'--config.optimizer.{key}={opt[key]!r} is not one of {", ".join(valid)}.')
  if not 0.0 <= opt.get('decay_fraction', 0.1) <= 1.0:
    raise ValueError(f'--config.optimizer.decay_fraction={opt.decay_fraction} must be a fraction in [0, 1].')
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
  if (config.task.doc_stride or 0) >= config.max_seq_length:
    raise ValueError(f'--config.task.doc_stride={config.task.doc_stride} must be below max_seq_length='
                     f'{config.max_seq_length} (minus the question); lower it or unset it (a quarter of the window).')
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


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, params: Any) -> optax.GradientTransformation:
  """`optim.make_optimizer` (AdamW or StableAdamW, clipping, warmup then decay) with warmup from `warmup_ratio`
  when `warmup_steps` is unset, and layer-wise LR decay (`optimizer.layer_decay`) over the encoder's layers."""
  return optim.make_optimizer(schedule_config(config, num_steps), num_steps, params, config.model.num_layers)


def eval_step(params: Any, batch: dict[str, jax.Array], *, model, task: str) -> tuple[jax.Array, ...]:
  """Predictions and per-row (loss sum, count) of one eval batch, summed on the host in row order."""
  logits = model.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['token_type_ids'])
  return (task_loss.predictions(logits, task), *task_loss.task_loss_rows(logits, batch['labels'], task))


def evaluate(params: Any, rows: dict[str, np.ndarray], p_eval_step, config: ml_collections.ConfigDict, mesh,
             label_names: list[str] | None, pad_token_id: int,
             score: Callable[[np.ndarray], dict] | None = None) -> dict[str, float]:
  """The task's metrics and loss over every row of a split, once (the last batch padded, weight 0): the same
  numbers for any eval_batch_size and mesh. `score`: the split's own metrics from all its rows' predictions
  (question answering: per question over its windows, with `num_examples` the questions)."""
  outputs = [parallel.fetch(p_eval_step(params, parallel.to_global(batch, mesh)))
             for batch in data_lib.eval_batches(rows, config.eval_batch_size, jax.process_index(),
                                                jax.process_count(), pad_token_id=pad_token_id)]
  n = len(rows['input_ids'])
  preds, losses, counts = (np.concatenate(x)[:n] for x in zip(*outputs))  # padding rows dropped
  result = (score(preds) if score is not None else
            task_metrics.compute(config.task.type, rows['labels'], preds, label_names))
  loss = float(np.sum(losses, dtype=np.float64) / max(np.sum(counts, dtype=np.float64), 1.0))
  return {'loss': loss, **result, 'num_examples': result.get('num_examples', n)}


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
  workdir_json.write_results(workdir, results)
  return results


def _check_parent(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """A multi-seed folder's config.json (`seeds` may grow) refuses a changed config before anything is written;
  returns {path: content}, written by seed 0 once its own checks (init model, data, its resume) pass."""
  path, new = os.path.join(workdir, 'config.json'), config.to_dict()
  old = workdir_json.saved_config(workdir)
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
  """The best step by `metric` (higher is better) and its params in `DIR/best/<step>`, apart from the resume
  checkpoints: retention there never touches them. After each checkpoint, `best/` keeps the best step of that
  (finished) checkpoint as well as the current one, so a crash never loses the params a resumed run reports; a
  resumed run prunes what came after its checkpoint (saved again, the same values, if they become best again),
  and the finished run keeps its best step only."""

  def __init__(self, workdir: str, metric: str):
    self.metric, self.history, self.step, self.saved = metric, [], None, None
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False))

  def resume(self, meta: dict) -> None:
    """Takes the evaluations and best step of a resumed checkpoint's metadata."""
    self.history, self.step = meta.get('history', []), meta.get('best_step')
    self.saved = self.step  # the best step of the last resume checkpoint: its params stay in best/
    self.prune({self.step})  # later ones are a crashed run's, maybe not this run's best

  def metrics(self, step: int | None = None) -> dict:
    step = self.step if step is None else step
    return next(h['metrics'] for h in self.history if h['step'] == step)

  def update(self, step: int, params: Any, result: dict) -> None:
    """Records an evaluation; saves the params when it is the best so far."""
    self.history.append({'step': step, 'metrics': result})
    if self.step is None or result[self.metric] > self.metrics()[self.metric]:
      self.step = step
      if step not in self.manager.all_steps():
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                        meta=ocp.args.JsonSave({'step': step, 'metrics': result})))

  def meta(self) -> dict:
    return {'history': self.history, 'best_step': self.step}

  def after_save(self) -> None:
    self.prune({self.saved, self.step})
    self.saved = self.step

  def prune(self, keep: set[int | None]) -> None:
    for step in self.manager.all_steps():
      if step not in keep:
        self.manager.delete(step)

  def restore(self, like: Any) -> Any:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self.manager.restore(self.step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']

  def close(self) -> None:
    self.manager.close()


class _Inputs(NamedTuple):
  """What a seed's run starts from, every check passed: its resolved config, tokenizer, task rows and the
  init model's encoder params and reusable head (or None)."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  task_rows: task_data.TaskData
  encoder_params: tuple[Any, dict | None]
  steps_per_epoch: int


def _load_inputs(config: ml_collections.ConfigDict, workdir: str) -> _Inputs:
  """Loads the init model and the task data and checks them against `workdir`'s run; writes nothing."""
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  task = config.task.type
  encoder = task_model.load_encoder(config.init, dtype=config.model.dtype)
  config = resolve_config(config, encoder.model.to_dict())
  old = workdir_json.saved_config(workdir)
  if old is not None:
    warning = validation.check_config_change(old, config.to_dict(), workdir)
    if warning and jax.process_index() == 0:
      print(warning, flush=True)
  saved_labels = workdir_json.read_labels(workdir)  # a resumed run keeps its label indices
  saved_names = None if saved_labels is None else saved_labels['label_names']
  task_rows = (qa.load_qa_data(config.data, config.task, encoder.tokenizer, config.max_seq_length)
               if task == 'question_answering' else
               task_data.load_task_data(config.data, task, encoder.tokenizer, config.max_seq_length, saved_names))
  num_train = len(task_rows.splits['train']['input_ids'])
  if num_train < config.batch_size:
    raise ValueError(f'The train split has {num_train} examples, fewer than one batch of {config.batch_size}; '
                     'lower --config.batch_size or add examples.')
  head = task_model.head_for_labels(encoder, task, task_rows.label_names)
  return _Inputs(config, encoder.tokenizer, task_rows, (encoder.params, head), num_train // config.batch_size)


def _write_run_files(inputs: _Inputs, workdir: str, first_writes: dict[str, dict]) -> None:
  """The parent's config (multi-seed), config.json, labels.json and the tokenizer: once every check passed."""
  config, task_rows = inputs.config, inputs.task_rows
  for path, content in first_writes.items():
    workdir_json.write_json(path, content)
  workdir_json.write_config(workdir, config.to_dict())
  workdir_json.write_json(os.path.join(workdir, 'labels.json'), {
      'task': config.task.type, 'num_labels': task_rows.num_labels, 'label_names': task_rows.label_names,
      'columns': task_rows.columns})
  if jax.process_index() == 0 and not os.path.isdir(os.path.join(workdir, 'tokenizer')):
    tokenizer_lib.save_atomic(inputs.tokenizer, os.path.join(workdir, 'tokenizer'))


def _init_state(config: ml_collections.ConfigDict, model: Any, encoder_params: tuple[Any, dict | None],
                num_steps: int, mesh) -> tuple[TrainState, optax.GradientTransformation, TrainState]:
  """(the state with the encoder's params and a fresh or reused head, sharded on `mesh`; its optimizer; its
  shardings), made in one jitted function (no op-by-op dispatch)."""
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(config.seed)
  abstract_params = jax.eval_shape(lambda r: task_model.init_task_params(r, model, config.max_seq_length), rng)
  tx = make_optimizer(config, num_steps, abstract_params)

  def create_state(encoder_params: tuple[Any, dict], rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    fresh = task_model.init_task_params(init_rng, model, config.max_seq_length)
    params = task_model.task_params_from_encoder(encoder_params[0], fresh, head=encoder_params[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

  shardings = train.state_shardings(mesh, jax.eval_shape(create_state, encoder_params, rng))
  return jax.jit(create_state, out_shardings=shardings)(encoder_params, rng), tx, shardings


def _run(config: ml_collections.ConfigDict, workdir: str, preempt: preemption.Watcher,
         on_exit: contextlib.ExitStack, first_writes: dict[str, dict]) -> dict:
  """One seed's run; nothing is written to `workdir` (nor `first_writes`, {path: JSON}) before every check passed."""
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  inputs = _load_inputs(config, workdir)
  config, task_rows, task = inputs.config, inputs.task_rows, inputs.config.task.type
  pad_token_id, steps_per_epoch = inputs.tokenizer.pad_token_id or 0, inputs.steps_per_epoch
  _write_run_files(inputs, workdir, first_writes)
  num_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  mesh = parallel.make_mesh(fsdp=config.fsdp)
  model = task_model.make_task_model(config.model, task, task_rows.num_labels, config.classifier_dropout,
                                     config.task.classifier_pooling)
  state, tx, shardings = _init_state(config, model, inputs.encoder_params, num_steps, mesh)
  del inputs

  ckpt = on_exit.enter_context(contextlib.closing(checkpoint.Checkpointer(workdir, config.max_checkpoints_to_keep)))
  best = on_exit.enter_context(contextlib.closing(_Best(workdir, config.metric_for_best)))
  meta = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    print(f'Resumed from {ckpt.directory} at step {int(state.step)}.', flush=True)
  start_step = int(state.step)
  best.resume(meta)

  p_eval_step = jax.jit(functools.partial(eval_step, model=model, task=task),
                        in_shardings=(shardings.params, parallel.data_sharding(mesh)),
                        out_shardings=parallel.replicated(mesh))
  run_eval = functools.partial(evaluate, p_eval_step=p_eval_step, config=config, mesh=mesh,
                               label_names=task_rows.label_names, pad_token_id=pad_token_id)
  writer = on_exit.enter_context(contextlib.closing(writers.MetricWriter(workdir, resume_step=start_step)))
  batches = data_lib.train_batches(task_rows.splits['train'], config.batch_size, config.seed, start_step,
                                   jax.process_index(), jax.process_count())
  objective = task_loss.TaskObjective(model, task)
  outcome = loop.run_loop(loop.Run(
      state=state, start_step=start_step, num_steps=num_steps,
      step=train.jit_step(objective, tx, mesh, state_sharding=shardings),
      batches=((parallel.to_global(b, mesh), None) for b in batches), summarize=objective.summarize,
      evaluate=lambda params: run_eval(params, task_rows.splits['validation'],
                                       score=task_rows.scorers.get('validation')),
      schedule=optim.make_schedule(schedule_config(config, num_steps), num_steps), writer=writer, ckpt=ckpt,
      log_every=config.log_every_steps, eval_every=eval_every,
      checkpoint_every=config.checkpoint_every_steps or eval_every,
      nonfinite=config.optimizer.nonfinite, tokens_per_step=lambda s: config.batch_size * config.max_seq_length,
      progress_bar=config.progress_bar, hparams=config.to_dict(), pending=loop.pending_from_meta(meta),
      on_eval=best.update, checkpoint_meta=lambda _: best.meta(), after_save=best.after_save,
      row_extras=lambda step: {'epoch': step / steps_per_epoch}), preempt)
  if outcome.preempted:
    return {'step': outcome.step, 'preempted': True}
  return _finish(config, workdir, outcome.state.params, best, task_rows, run_eval, writer, start_step, num_steps)


def _finish(config: ml_collections.ConfigDict, workdir: str, params: Any, best: _Best, task_rows: task_data.TaskData,
            run_eval: Callable, writer: writers.MetricWriter, start_step: int, num_steps: int) -> dict:
  """results.json: the best step's validation metrics, and the test split's from the best params."""
  best.prune({best.step})
  results_metrics = dict(best.metrics())
  results_metrics.pop('num_examples', None)
  splits = task_rows.splits
  if 'test' in splits and 'labels' in splits['test']:
    best_params = params if best.step == num_steps else best.restore(params)
    test = run_eval(best_params, splits['test'], score=task_rows.scorers.get('test'))
    if start_step < num_steps:  # logged once, after the last step (a rerun of a finished run adds no row)
      writer.write(num_steps, 'test', {**test, 'best_step': best.step})
    results_metrics.update({f'test_{k}': v for k, v in test.items() if k != 'num_examples'})
  results = {'task': config.task.type, 'metrics': results_metrics,
             'per_seed': [{'seed': config.seed, 'best_step': best.step, 'metrics': results_metrics}],
             'best_step': best.step}
  workdir_json.write_results(workdir, results)
  return results


def schedule_config(config: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
  """`optimizer` with `warmup_steps` set (from `warmup_ratio` of the run's steps when unset)."""
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  if opt.warmup_steps is None:
    opt.warmup_steps = int(round(opt.warmup_ratio * num_steps))
  return opt
