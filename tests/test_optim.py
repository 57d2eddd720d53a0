"""Optimizers and schedules (`mlm_flax.optim`): warmup-stable-decay and StableAdamW."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mlm_flax import optim, validation


def _opt(**kw) -> ml_collections.ConfigDict:
  base = dict(learning_rate=1e-2, warmup_steps=10, schedule='wsd', decay_fraction=0.2, decay_shape='linear',
              end_learning_rate_factor=0.0, weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=0.0,
              type='adamw')
  return ml_collections.ConfigDict({**base, **kw})


def test_wsd_is_a_trapezoid():
  """Linear warmup, the peak held, then the last `decay_fraction` of the steps down to the end value."""
  lr = optim.make_schedule(_opt(), 100)
  values = np.asarray([lr(s) for s in range(101)])
  np.testing.assert_allclose(values[:11], np.linspace(0, 1e-2, 11), rtol=1e-6, atol=1e-12)
  np.testing.assert_array_equal(values[10:81], np.float32(1e-2))  # held exactly
  np.testing.assert_allclose(values[80:], np.linspace(1e-2, 0, 21), rtol=1e-5, atol=1e-9)
  assert optim.wsd_decay_start(_opt(), 100) == 80
  sqrt = optim.make_schedule(_opt(decay_shape='1-sqrt'), 100)
  np.testing.assert_allclose(float(sqrt(85)), 1e-2 * (1 - np.sqrt(5 / 20)), rtol=1e-6)


def _train(tx_for_step, steps: int) -> tuple[dict, list]:
  """A few AdamW steps on a tiny quadratic; `tx_for_step(s)` is the transformation used at step s (the same
  state structure for each, as when a run is resumed with another num_train_steps)."""
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  state = tx_for_step(0).init(params)
  for s in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p * (s + 1)), params)
    updates, state = tx_for_step(s).update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_wsd_train_longer_on_resume_equals_a_longer_run():
  """Resumed before its cool-down with twice the steps, a 'wsd' run is bit for bit the longer run; a linear
  decay is not (the claim `check_config_change` makes for 'wsd' only)."""
  for kind in ('adamw', 'stable_adamw'):
    short, long = (optim.make_optimizer(_opt(type=kind), n) for n in (40, 80))
    resumed = _train(lambda s: short if s < 25 else long, 60)  # 25 < decay start 32 of the 40-step run
    jax.tree.map(np.testing.assert_array_equal, resumed, _train(lambda s: long, 60))
  short, long = (optim.make_optimizer(_opt(schedule='linear'), n) for n in (40, 80))
  a, b = _train(lambda s: short if s < 25 else long, 60), _train(lambda s: long, 60)
  assert not np.array_equal(a['w'], b['w'])
  warning = validation.check_config_change(
      {'num_train_steps': 40, 'optimizer': _opt().to_dict()}, {'num_train_steps': 80, 'optimizer': _opt().to_dict()},
      'DIR')
  assert 'at or before step 32' in warning


def test_stable_adamw_is_adamw_until_a_gradient_spike():
  """With shrinking gradients the RMS of g / sqrt(v) is at most 1: StableAdamW's step is AdamW's. A gradient 1000x
  its running scale makes AdamW's step jump; StableAdamW's is divided by that RMS, per tensor."""
  opt = _opt(schedule='constant', warmup_steps=0, weight_decay=0.0)
  adamw, stable = optim.make_optimizer(opt, 100), optim.make_optimizer(_opt(**{**opt, 'type': 'stable_adamw'}), 100)
  params = {'w': jnp.ones((4, 4)), 'v': jnp.ones((4, 4))}
  states = [adamw.init(params), stable.init(params)]
  rng = np.random.default_rng(0)
  base = {k: jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) for k in params}
  for s in range(20):
    grads = jax.tree.map(lambda g: g * 0.95 ** s, base)  # shrinking: g^2 below its running average v
    if s == 19:
      grads['w'] = grads['w'] * 1000.0  # a spike in one tensor
    (ua, states[0]), (us, states[1]) = adamw.update(grads, states[0], params), stable.update(grads, states[1], params)
    if s < 19:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ua, us)
  nu = optax.tree.bias_correction(states[1][1].adam.nu, 0.98, states[1][1].adam.count)['w']
  rms = float(jnp.sqrt(jnp.mean(jnp.square(grads['w'] / jnp.maximum(jnp.sqrt(nu), 1e-6)))))
  assert rms > 2.0
  np.testing.assert_allclose(us['w'], ua['w'] / rms, rtol=1e-4)
  np.testing.assert_allclose(us['v'], ua['v'], rtol=1e-5)  # the other tensor is untouched
  with pytest.raises(ValueError, match='optimizer.type'):
    optim.make_optimizer(_opt(type='lion'), 10)


def test_validation_copies_of_the_choices():
  assert validation.CHOICES['optimizer.schedule'] == optim.SCHEDULES
  assert validation.CHOICES['optimizer.decay_shape'] == optim.DECAY_SHAPES
  assert validation.CHOICES['optimizer.type'] == optim.OPTIMIZERS


@pytest.mark.parametrize('scale', [0.1, 100.0])  # under and over the clip norm
def test_clip_takes_the_guards_norm_and_matches_optax(scale):
  """`optim.clip_by_global_norm` is optax's clip, whether it sums the squares itself or is handed the norm the
  training step's guard computed (`grad_norm=`, as `train.apply_if_finite` passes it)."""
  rng = np.random.default_rng(0)
  grads = {'w': jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32),
           'b': jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}
  ours = optim.clip_by_global_norm(1.0)

  @jax.jit
  def clipped(g):
    return (optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0], ours.update(g, ours.init(g))[0],
            ours.update(g, ours.init(g), grad_norm=optax.tree.norm(g))[0])
  expected, summed, handed = clipped(grads)
  for got in (summed, handed):
    for k in grads:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(expected[k]))
  tx = optim.make_optimizer(_opt(grad_clip_norm=1.0, schedule='linear'), 10)
  state = tx.init(grads)
  plain, _ = tx.update(grads, state, grads)
  handed, _ = tx.update(grads, state, grads, grad_norm=optax.tree.norm(grads))
  for k in grads:
    np.testing.assert_array_equal(np.asarray(handed[k]), np.asarray(plain[k]))
