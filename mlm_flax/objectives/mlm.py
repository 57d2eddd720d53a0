"""The MLM objective: the run's masking function, logits at the masked positions, token-weighted
cross-entropy, accuracy.

Metrics are returned as sums (`loss_sum`, `correct`, `count`) so they add up exactly
across steps, batches and hosts; the loss that is differentiated is normalised by
the number of masked tokens in the *global* batch.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax.data import tokenizer
from mlm_flax.kernels import onednn
from mlm_flax.models import abstract_params as abstract_params_of
from mlm_flax.models import make_model
from mlm_flax.objectives import masking
from mlm_flax.objectives.masking import Masked

MaskFn = Callable[..., Masked]


def _rate(config: ml_collections.ConfigDict, split: str) -> tuple[float | Callable[[jax.Array], jax.Array], float]:
  """The masking rate of `split` (a float, or for training with `masking.rate_schedule` a function of the step)
  and the highest rate it takes, which sets the static prediction budget."""
  m = config.masking
  if split == 'eval':
    rate = m.rate if m.get('eval_rate') is None else m.eval_rate
    return rate, rate
  kind, final = m.get('rate_schedule', 'constant'), m.get('final_rate')
  if kind == 'constant' or final is None:
    return m.rate, m.rate
  steps = m.get('schedule_steps', 0) or config.num_train_steps
  return masking.rate_schedule(kind, m.rate, final, steps), max(m.rate, final)


def prediction_budget(config: ml_collections.ConfigDict, seq_length: int, split: str = 'train') -> int:
  """The static number of predictions per row of `seq_length` tokens (of the highest rate of `split`)."""
  return masking.max_predictions(seq_length, _rate(config, split)[1], config.masking.get('strategy', 'token'))


def make_mask_fn(config: ml_collections.ConfigDict, tok, split: str = 'train') -> tuple[MaskFn, int]:
  """The masking function for `split` ('train' or 'eval') and its static prediction budget.

  The function takes (rng, ids, maskable=..., step=...); `step` (the 0-based train step, traced) matters only
  with a training `masking.rate_schedule`.
  """
  rate, max_rate = _rate(config, split)
  strategy = config.masking.get('strategy', 'token')
  word_starts = None if strategy == 'token' else jnp.asarray(tokenizer.word_start_table(tok))
  fn = functools.partial(
      masking.mask_tokens, vocab_size=len(tok), mask_id=tok.mask_token_id,
      special_ids=tokenizer.special_token_ids(tok), pad_id=tok.pad_token_id, rate=rate,
      mask_prob=config.masking.mask_prob, random_prob=config.masking.random_prob, strategy=strategy,
      word_starts=word_starts, max_span_length=config.masking.get('max_span_length', 10),
      span_p=config.masking.get('span_p', 0.2), max_rate=max_rate)
  return fn, prediction_budget(config, config.max_seq_length, split)


def mask_rows(mask_fn: MaskFn, rng: jax.Array, row_ids: jax.Array, ids: jax.Array,
              maskable: jax.Array) -> Masked:
  """`mask_fn` applied to each row [length] of `ids` with its own key `fold_in(rng, row_id)`: masks that depend on
  the row's index in its split, not on the batch it is in (evaluation)."""
  def one(row_id, row, can):
    masked = mask_fn(jax.random.fold_in(rng, row_id), row[None], maskable=can[None])
    return jax.tree.map(lambda x: x[0], masked)
  return jax.vmap(one)(row_ids, ids, maskable)


def gather_predictions(masked: Masked, num_predictions: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions [batch, P] of the masked tokens (padded with weight 0), their targets and weights."""
  _, positions = jax.lax.top_k(masked.weights, num_predictions)
  take = lambda x: jnp.take_along_axis(x, positions, axis=1)
  return positions, take(masked.targets), take(masked.weights)


def masked_logits(params: Any, model: nn.Module, batch: dict[str, jax.Array], masked: Masked, positions: jax.Array,
                  dropout_rng: jax.Array | None = None) -> jax.Array:
  """The masked LM's logits [batch, P, vocab] at `positions` [batch, P] of `masked.inputs`. Dropout is on iff
  `dropout_rng`; it draws per row from `batch['row_ids']` (the rows' indices in the global batch) when the batch
  has them."""
  return model.apply({'params': params}, masked.inputs, batch['segment_ids'], batch['positions'],
                     masked_positions=positions, deterministic=dropout_rng is None, row_ids=batch.get('row_ids'),
                     rngs=None if dropout_rng is None else {'dropout': dropout_rng})


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] [...] of `logits` [..., vocab] (in f32) at integer `targets` [...]: the values
  and gradient of `-take_along_axis(jax.nn.log_softmax(logits), targets)`, each term in autodiff's rounding (bit
  for bit on the CPUs measured; XLA's `log` and `exp` may differ by an ulp between fusions).

  Its backward is the closed form, one elementwise pass over the logits: autodiff's chain (the take's cotangent
  scattered into a [..., vocab] one-hot, log_softmax's row sum of it, then their combination) made three passes,
  ~60 ms of a ModernBERT-base step on CPU (vocabulary 30,522)."""
  return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
  x = logits.astype(jnp.float32)
  peak = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))  # as jax.nn.log_softmax
  shifted = x - peak
  total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
  ce = -(jnp.take_along_axis(shifted, targets[..., None], axis=-1) - jnp.log(total))[..., 0]
  return ce, (logits, targets, peak, total)  # the row statistics kept: the backward reads the logits once


def _cross_entropy_bwd(res, g):
  logits, targets, peak, total = res
  shifted = logits.astype(jnp.float32) - peak
  g = g[..., None]
  target = jnp.arange(logits.shape[-1]) == targets[..., None]
  # autodiff's terms, in its rounding: the take's cotangent (-g at the target) plus log-sum-exp's
  # (g / total) * exp(shifted)
  dlogits = jnp.where(target, -g, 0.0) + (g / total) * jnp.exp(shifted)
  return dlogits.astype(logits.dtype), np.zeros(targets.shape, jax.dtypes.float0)


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)`, the same index (the first maximum; the first NaN where there is one), as a maximum
  and a minimum over indices: XLA:CPU runs argmax's (value, index) reduction without vector instructions, 3.8
  ms per step at the quick start's [16, 51, 2048] logits (6% of its bf16 step), these two 0.7 ms."""
  hit = (x == jnp.max(x, axis=-1, keepdims=True)) | jnp.isnan(x)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def prediction_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                    fused: bool = False) -> dict[str, jax.Array]:
  """Summed cross-entropy (`loss_sum`, in f32), `count` and `correct` of `logits` [batch, P, vocab] at
  `targets` [batch, P], weighted by `weights` [batch, P]. `fused`: the loss and the argmax as one CPU kernel each
  way (`onednn.cross_entropy_argmax`; where `onednn.cross_entropy_enabled`), the same index and the loss to f32
  rounding."""
  if fused:
    ce, best = onednn.cross_entropy_argmax(logits, targets)
  else:
    ce, best = cross_entropy(logits, targets), argmax(logits)
  return {'loss_sum': (ce * weights).sum(), 'count': weights.sum(), 'correct': ((best == targets) * weights).sum()}


def mlm_loss(params: Any, model: nn.Module, batch: dict[str, jax.Array], masked: Masked,
             num_predictions: int, dropout_rng: jax.Array | None = None,
             baseline_token: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over masked tokens, and summed metrics. Dropout is on iff `dropout_rng`; it draws per
  row from `batch['row_ids']` (the rows' indices in the global batch) when the batch has them."""
  positions, targets, weights = gather_predictions(masked, num_predictions)
  logits = masked_logits(params, model, batch, masked, positions, dropout_rng)
  config = getattr(model, 'config', None)
  fused = config is not None and onednn.cross_entropy_enabled(config.resolved.compute_dtype)
  metrics = prediction_sums(logits, targets, weights, fused=fused)
  loss_sum, count = metrics['loss_sum'], metrics['count']
  if baseline_token is not None:  # accuracy of always predicting the most frequent token
    metrics['baseline_correct'] = ((targets == baseline_token) * weights).sum()
  return loss_sum / jnp.maximum(count, 1.0), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Summed metrics → loss, masked_accuracy, perplexity (and counts)."""
  count = max(float(sums['count']), 1.0)
  loss = float(sums['loss_sum']) / count
  out = {'loss': loss, 'masked_accuracy': float(sums['correct']) / count,
         'perplexity': math.exp(min(loss, 80.0)), 'num_masked_tokens': int(sums['count'])}
  if 'baseline_correct' in sums:
    out['unigram_baseline_accuracy'] = float(sums['baseline_correct']) / count
  return out


@dataclasses.dataclass(frozen=True)
class MLM:
  """The masked-LM objective of one model, in the interface of `mlm_flax.objectives` (train step, evaluator,
  loop). `num_predictions` may be a function of the sequence length (sequence-length warm-up)."""
  model: nn.Module
  mask_fn: MaskFn
  num_predictions: int | Callable[[int], int]
  baseline_token: int | None = None  # eval: also count the accuracy of always predicting this token

  def init_params(self, rng: jax.Array, seq_len: int) -> Any:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, ids, jnp.ones_like(ids))['params']

  def prepare(self, rng: jax.Array, batch: dict[str, jax.Array], step: jax.Array) -> tuple[Masked, dict]:
    masked = self.mask_fn(rng, batch['input_ids'], maskable=batch['segment_ids'] > 0, step=step)
    return masked, {'count': masked.weights.sum()}

  def prepare_eval(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Masked, dict]:
    """Evaluation's masks: row r of the split (`batch['row_ids']`) masked with fold_in(rng, r)."""
    masked = mask_rows(self.mask_fn, rng, batch['row_ids'], batch['input_ids'], batch['segment_ids'] > 0)
    return masked, {'count': masked.weights.sum()}

  def loss(self, params: Any, batch: dict[str, jax.Array], masked: Masked, totals: dict,
           rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    n = self.num_predictions
    n = n(batch['input_ids'].shape[-1]) if callable(n) else n
    _, sums = mlm_loss(params, self.model, batch, masked, n, rng, self.baseline_token)
    return sums['loss_sum'] / jnp.maximum(totals['count'], 1.0), sums

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    return summarize(sums)

  def mlm_model(self, params: Any) -> tuple[nn.Module, Any]:
    return self.model, params


def make(config: ml_collections.ConfigDict, tok, split: str = 'train') -> MLM:
  """The MLM objective of a resolved config: its model and the masking of `split`."""
  return MLM(make_model(config.model), *make_mask_fn(config, tok, split))


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of a run's params, without allocating them (restoring a checkpoint)."""
  return abstract_params_of(make_model(config.model))


def mlm_of(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, nn.Module, Any]:
  """The run's masked LM: its `model` config, module and params (fill-mask)."""
  return config.model, make_model(config.model), params


def encoder_of(params: Any) -> Any:
  """The params fine-tuning starts from (the MLM's tree; `tasks.model` takes its encoder keys)."""
  return params
