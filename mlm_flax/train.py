"""Training: TrainState, optimizer, `train_step`, and the loop `train_and_evaluate(config, workdir)`."""

import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from mlm_flax import checkpoint, data, evaluate, inference, loss, masking, parallel, tokenizer, writers
from mlm_flax.model import make_model


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


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
               mask_fn: loss.MaskFn, num_predictions: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the global batch: mask in-graph, forward, token-weighted CE, AdamW."""
  mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  masked = mask_fn(mask_rng, batch['input_ids'], maskable=batch['segment_ids'] > 0)
  grad_fn = jax.value_and_grad(loss.mlm_loss, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, model, batch, masked, num_predictions, dropout_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics['grad_norm'] = optax.tree.norm(grads)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  return state, metrics


def jit_train_step(model, tx: optax.GradientTransformation, mask_fn: loss.MaskFn, num_predictions: int,
                   mesh: jax.sharding.Mesh):
  """`train_step` jitted over `mesh`: batch split on the data axis, state replicated and donated."""
  repl = parallel.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, mask_fn=mask_fn, num_predictions=num_predictions),
      in_shardings=(repl, parallel.data_sharding(mesh)), out_shardings=(repl, repl), donate_argnums=0)


def make_mask_fn(config: ml_collections.ConfigDict, tok, split: str = 'train') -> tuple[loss.MaskFn, int]:
  """The masking function for `split` ('train' or 'eval') and its static prediction budget."""
  rate = config.masking.rate
  if split == 'eval' and config.masking.get('eval_rate') is not None:
    rate = config.masking.eval_rate
  strategy = config.masking.get('strategy', 'token')
  word_starts = None if strategy == 'token' else jnp.asarray(tokenizer.word_start_table(tok))
  fn = functools.partial(
      masking.mask_tokens, vocab_size=len(tok), mask_id=tok.mask_token_id,
      special_ids=tokenizer.special_token_ids(tok), pad_id=tok.pad_token_id, rate=rate,
      mask_prob=config.masking.mask_prob, random_prob=config.masking.random_prob, strategy=strategy,
      word_starts=word_starts, max_span_length=config.masking.get('max_span_length', 10),
      span_p=config.masking.get('span_p', 0.2))
  return fn, masking.max_predictions(config.max_seq_length, rate, strategy)


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
  if config.max_seq_length > config.model.max_position_embeddings:
    raise ValueError(f'max_seq_length={config.max_seq_length} exceeds model.max_position_embeddings='
                     f'{config.model.max_position_embeddings}; lower one or raise the other.')
  return config


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; on resume, refuses a model that differs from the checkpointed one."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)['model']
    diff = {k: (old.get(k), v) for k, v in config.model.to_dict().items() if old.get(k) != v}
    if diff:
      raise ValueError(f'{workdir} holds a run with a different model config {diff} (old, new); '
                       'use a new --workdir or the old model settings.')
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(config.to_dict(), f, indent=2)
    os.replace(path + '.tmp', path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, checkpoints.

  Returns the final evaluation metrics.
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, config.max_checkpoints_to_keep)
  if ckpt.latest_step() is None and ckpt.has_imported():  # continue pretraining imported weights
    with open(os.path.join(workdir, 'config.json')) as f:
      imported_model = json.load(f)['model']
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(imported_model)
    print(f'Starting from the weights imported into {workdir} (model config taken from its config.json).')
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

  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  model = make_model(config.model)
  tx = make_optimizer(config.optimizer, config.num_train_steps)
  mask_fn, num_predictions = make_mask_fn(config, tok)

  state = jax.jit(functools.partial(create_train_state, model=model, tx=tx, seq_len=config.max_seq_length),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))
  meta = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    print(f'Resumed from {ckpt.directory} at step {int(state.step)}.')
  elif ckpt.has_imported():
    params = ckpt.restore_imported(state.params)
    state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params))
  start_step = int(state.step)

  p_train_step = jit_train_step(model, tx, mask_fn, num_predictions, mesh)
  rows = eval_rows if train_rows is None else train_rows
  counts = np.bincount(rows['input_ids'][rows['segment_ids'] > 0], minlength=len(tok))
  counts[list(tokenizer.special_token_ids(tok))] = 0
  baseline = int(counts.argmax())  # the unigram baseline predicts the most frequent training token
  evaluator = evaluate.Evaluator(model, *make_mask_fn(config, tok, 'eval'), mesh, config.seed,
                                 baseline_token=baseline)
  writer = writers.MetricWriter(workdir, resume_step=start_step)

  def run_eval(step: int, log: bool = True) -> dict:
    result = evaluator(state.params, eval_rows, config.eval_batch_size, config.max_eval_batches)
    if log:
      writer.write(step, 'eval', result)
    return {'step': step, **result}

  batches = data.train_iterator(config, splits['train'] if train_rows is None else train_rows, tok, mesh,
                                start_step, meta.get('data_position'))  # prepared on a background thread
  tokens_per_step = config.batch_size * config.max_seq_length
  schedule = make_schedule(config.optimizer, config.num_train_steps)
  pending, last_time, last_step, result = [], time.time(), start_step, None
  bar = tqdm(total=config.num_train_steps, initial=start_step, unit='step', dynamic_ncols=True,
             disable=not config.progress_bar or jax.process_index() != 0)
  for step in range(start_step + 1, config.num_train_steps + 1):
    batch, data_position = next(batches)
    state, metrics = p_train_step(state, batch)
    pending.append(metrics)
    if len(pending) > 1:  # keep one step queued, so the bar and ETA follow real progress
      jax.block_until_ready(pending[-2]['count'])
    bar.update(1)
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      sums = jax.tree.map(lambda *x: np.sum(x), *parallel.fetch(pending))  # the only sync point
      now = time.time()
      summary = loss.summarize(sums)
      summary.update(grad_norm=float(sums['grad_norm']) / len(pending),
                     learning_rate=float(schedule(step - 1)),
                     tokens_per_second=tokens_per_step * (step - last_step) / (now - last_time))
      writer.write(step, 'train', summary)
      bar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['masked_accuracy']:.3f}",
                      tok_s=f"{summary['tokens_per_second']:.0f}")
      if bar.disable and jax.process_index() == 0:  # no bar (logs, notebooks): one line per log step
        eta = (config.num_train_steps - step) * (now - last_time) / (step - last_step)
        print(f"step {step}/{config.num_train_steps}: loss {summary['loss']:.4f} masked_accuracy "
              f"{summary['masked_accuracy']:.4f} {summary['tokens_per_second']:.0f} tokens/s ETA {eta:.0f}s",
              flush=True)
      pending, last_time, last_step = [], now, step
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      result = run_eval(step)
      bar.write(f"step {step}: eval loss {result['loss']:.4f} masked_accuracy "
                f"{result['masked_accuracy']:.4f} (unigram baseline {result['unigram_baseline_accuracy']:.4f})")
      last_time = time.time()  # eval time is not training throughput
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
      ckpt.save(step, state, {'step': step, 'data_position': data.checkpoint_position(data_position)})
  bar.close()
  batches.close()
  if result is None:  # nothing left to train: report, but do not log the same eval twice
    result = run_eval(start_step, log=False)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if config.fill_mask_examples and jax.process_index() == 0:
    mlm = inference.MLM(config=config, params=state.params, tokenizer=tok, model=model)
    print('Fill-mask on held-out sentences:')
    for text, answer in inference.held_out_examples(splits['validation']['text'], tok, config.fill_mask_examples):
      preds = inference.fill_mask(mlm, text, top_k=5)
      print(f'  {text}  (held-out word: {answer})\n    -> '
            + ', '.join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))
  return result
