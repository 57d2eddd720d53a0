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


def test_cross_entropy_equals_log_softmax_autodiff():
  """`cross_entropy`'s closed-form backward gives autodiff's gradients (f32 and bf16 logits, a vocabulary wide
  enough for blocked sums), to an ulp: two XLA programs may evaluate `exp` and `log` differently by fusion (the
  values differed by 1 ulp here). Bit for bit on this machine; not asserted, it is XLA's, not a promise."""
  rng = np.random.default_rng(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = jnp.asarray(rng.standard_normal((3, 7, 2053)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, 2053, (3, 7)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 7)), jnp.float32)

    def autodiff(x):
      logp = jax.nn.log_softmax(x.astype(jnp.float32))
      return (-jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights).sum()

    want = jax.jit(jax.value_and_grad(autodiff))(logits)
    got = jax.jit(jax.value_and_grad(lambda x: (loss.cross_entropy(x, targets) * weights).sum()))(logits)
    assert got[1].dtype == dtype
    np.testing.assert_allclose(np.float32(got[0]), np.float32(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=1e-6,
                               atol=1e-12)


def test_add_bias_gradient_is_the_sum_over_rows():
  """`layers.add_bias` sums the bias gradient as a dot with ones: autodiff's sum in another order."""
  from mlm_flax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.standard_normal((4, 9, 301)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(301), jnp.float32)
  f = lambda add: jax.grad(lambda y, b: jnp.sum(jnp.sin(add(y, b)) * y), argnums=(0, 1))(y, bias)
  (dy, db), (want_dy, want_db) = f(layers.add_bias), f(lambda y, b: y + b)
  np.testing.assert_array_equal(np.asarray(dy), np.asarray(want_dy))
  np.testing.assert_allclose(np.asarray(db), np.asarray(want_db), rtol=1e-5, atol=1e-5)


def test_argmax_is_jnp_argmax_on_ties_nans_and_signed_zeros():
  # `mlm.argmax` replaces argmax's slow (value, index) reduction in the accuracy metric: the same index always.
  x = np.random.default_rng(0).normal(size=(6, 5, 300)).astype(np.float32)
  x[0, 0, [7, 40, 299]] = 9.0  # a tie: the first
  x[0, 1, [3, 8]] = np.nan  # NaNs: the first NaN, wherever the maximum is
  x[0, 2] = 0.0
  x[0, 2, 5] = -0.0  # signed zeros compare equal: the first
  x[0, 3] = -np.inf
  x[0, 4, 299] = np.inf
  x[1, :, :] = np.round(x[1] * 2) / 2  # many ties
  for dtype in (jnp.float32, jnp.bfloat16):
    xs = jnp.asarray(x, dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(loss.argmax)(xs)), np.asarray(jnp.argmax(xs, axis=-1)))
