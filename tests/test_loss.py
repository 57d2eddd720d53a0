"""`loss.mlm_loss` against optax's cross-entropy on the full logits: weighted mean and summed metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import tiny_config
from mlm_flax.objectives import masking
from mlm_flax.objectives import mlm as loss
from mlm_flax import models as model_lib

MASK_ID, BASELINE = 4, 9


def _setup():
  c = tiny_config().model
  c.update(vocab_size=97, pad_token_id=0)
  m = model_lib.make_model(c)
  ids = np.random.default_rng(0).integers(5, 97, (2, 12)).astype(np.int32)
  weights = np.zeros((2, 12), np.float32)
  weights[0, [1, 4, 7]] = 1.0  # 3 masked tokens; the budget of 4 leaves one weight-0 slot
  weights[1, [2, 3]] = 1.0  # 2 masked tokens, two weight-0 slots
  ids[0, 4] = ids[1, 3] = BASELINE  # the "most frequent token" is the target at two masked positions
  segment_ids = np.ones((2, 12), np.int32)
  segment_ids[1, 10:] = 0  # padding
  batch = {'segment_ids': jnp.asarray(segment_ids), 'positions': jnp.broadcast_to(jnp.arange(12), (2, 12))}
  masked = masking.Masked(inputs=jnp.asarray(np.where(weights > 0, MASK_ID, ids)), targets=jnp.asarray(ids),
                          weights=jnp.asarray(weights))
  params = m.init(jax.random.PRNGKey(1), masked.inputs, batch['segment_ids'])['params']
  # Two masked targets the model gets right (its argmax there; inputs hold the mask, so logits do not move).
  best = np.asarray(m.apply({'params': params}, masked.inputs, batch['segment_ids']).argmax(-1))
  ids[0, 1], ids[1, 2] = best[0, 1], best[1, 2]
  return m, params, batch, masked._replace(targets=jnp.asarray(ids))


def test_mlm_loss_is_the_weighted_mean_cross_entropy_at_masked_positions():
  m, params, batch, masked = _setup()
  value, metrics = loss.mlm_loss(params, m, batch, masked, num_predictions=4, baseline_token=BASELINE)

  logits = m.apply({'params': params}, masked.inputs, batch['segment_ids'], batch['positions'])  # every position
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, masked.targets)
  w = masked.weights
  np.testing.assert_allclose(float(metrics['loss_sum']), float((ce * w).sum()), rtol=1e-5)
  np.testing.assert_allclose(float(value), float((ce * w).sum() / w.sum()), rtol=1e-5)
  assert float(metrics['count']) == 5.0
  correct = float(((logits.argmax(-1) == masked.targets) * w).sum())
  assert float(metrics['correct']) == correct and correct >= 2
  assert float(metrics['baseline_correct']) == 2.0
  summary = loss.summarize(jax.device_get(metrics))
  np.testing.assert_allclose(summary['loss'], float(value), rtol=1e-6)
  np.testing.assert_allclose(summary['perplexity'], np.exp(float(value)), rtol=1e-5)
  assert summary['num_masked_tokens'] == 5 and summary['unigram_baseline_accuracy'] == 2 / 5


def test_mlm_loss_with_nothing_masked_is_zero_not_nan():
  m, params, batch, masked = _setup()
  none = masked._replace(inputs=masked.targets, weights=jnp.zeros_like(masked.weights))
  value, metrics = loss.mlm_loss(params, m, batch, none, num_predictions=4)
  assert float(value) == 0.0 and float(metrics['count']) == 0.0 and float(metrics['correct']) == 0.0
