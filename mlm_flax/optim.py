"""Optimizers and learning-rate schedules, for pretraining and fine-tuning alike.

Schedules (`optimizer.schedule`): linear warmup, then linear / cosine decay, constant, or warmup-stable-decay
('wsd', the trapezoid of ModernBERT: the peak held until the last `decay_fraction` of the steps, then a linear or
1-sqrt cool-down; a run resumed with more steps before its cool-down began is the run that had them from the
start). Optimizers (`optimizer.type`): AdamW, or StableAdamW (AdamW whose step per tensor is divided by
max(1, RMS(g / sqrt(v))), Wortsman et al. 2023, as ModernBERT trains), both with global-norm clipping, no weight
decay on biases and norms (1-D params), and optional layer-wise learning-rate decay (`optimizer.layer_decay`).
"""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('linear', 'cosine', 'constant', 'wsd')
DECAY_SHAPES = ('linear', '1-sqrt')
OPTIMIZERS = ('adamw', 'stable_adamw')


def _wsd_decay(peak: float, end: float, stable: int, decay: int, shape: str) -> optax.Schedule:
  """The peak for `stable` steps, then down to `end` over `decay` steps (linear, or 1 - sqrt of the fraction)."""
  def schedule(count):
    frac = jnp.clip((count - stable) / max(decay, 1), 0.0, 1.0)
    drop = jnp.sqrt(frac) if shape == '1-sqrt' else frac
    return peak + (end - peak) * drop
  return schedule


def make_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear / cosine decay, constant, or stable-then-decay ('wsd')."""
  peak, warmup = opt.learning_rate, min(opt.warmup_steps, num_train_steps)
  end = peak * opt.end_learning_rate_factor
  decay_steps = max(num_train_steps - warmup, 1)
  if opt.schedule not in SCHEDULES:
    raise ValueError(f'optimizer.schedule={opt.schedule!r}; use one of {", ".join(SCHEDULES)}')
  if opt.schedule == 'wsd':
    cooldown = min(int(round(opt.get('decay_fraction', 0.1) * num_train_steps)), num_train_steps - warmup)
    after = _wsd_decay(peak, end, num_train_steps - warmup - cooldown, cooldown, opt.get('decay_shape', 'linear'))
  else:
    after = {'linear': lambda: optax.linear_schedule(peak, end, decay_steps),
             'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_learning_rate_factor),
             'constant': lambda: optax.constant_schedule(peak)}[opt.schedule]()
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def wsd_decay_start(opt: ml_collections.ConfigDict, num_train_steps: int) -> int:
  """The first step of a 'wsd' schedule's cool-down: steps before it do not depend on num_train_steps."""
  warmup = min(opt.warmup_steps, num_train_steps)
  return num_train_steps - min(int(round(opt.get('decay_fraction', 0.1) * num_train_steps)),
                               num_train_steps - warmup)


class StableAdamState(NamedTuple):
  adam: optax.ScaleByAdamState


def stable_adamw(learning_rate: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 mask: Any = None) -> optax.GradientTransformation:
  """AdamW whose step (Adam direction plus decoupled weight decay) of each tensor is divided by
  max(1, RMS(g / max(sqrt(v_hat), eps))): a gradient far above its running scale cannot blow the step up."""
  adam = optax.scale_by_adam(b1, b2, eps)

  def init(params):
    return StableAdamState(adam.init(params))

  def update(grads, state, params=None):
    direction, adam_state = adam.update(grads, state.adam, params)
    nu_hat = optax.tree.bias_correction(adam_state.nu, b2, adam_state.count)
    decays = mask(params) if callable(mask) else jax.tree.map(lambda _: True, params)

    def step(d, g, v, p, decay):
      rms = jnp.sqrt(jnp.mean(jnp.square(g / jnp.maximum(jnp.sqrt(v), eps))))
      d = d + weight_decay * p if decay else d
      return d / jnp.maximum(1.0, rms)
    steps = jax.tree.map(step, direction, grads, nu_hat, params, decays)
    lr = learning_rate(adam_state.count - 1)  # the count Adam has just advanced: the same step index as AdamW's
    return jax.tree.map(lambda s: -lr * s, steps), StableAdamState(adam_state)

  return optax.GradientTransformation(init, update)


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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm`, the same update, taking the gradient's global norm as `grad_norm=` where the
  caller has it (`train.apply_if_finite` computes it for its guard): summing every tensor's squares a second
  time was ~30 reductions per step, ~1 ms of the quick start's ~55 ms bf16 step on CPU."""
  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    keep = jnp.squeeze(norm < max_norm)
    return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state
  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int, params: Any = None,
                   num_layers: int | None = None) -> optax.GradientTransformation:
  """AdamW or StableAdamW (`opt.type`) with global-norm clipping; no weight decay on biases and norms (1-D params);
  with `opt.layer_decay` (and `params`, `num_layers`), layer-wise learning-rate decay as a per-leaf scale."""
  kind = opt.get('type', 'adamw')
  if kind not in OPTIMIZERS:
    raise ValueError(f'optimizer.type={kind!r}; use one of {", ".join(OPTIMIZERS)}')
  schedule = make_schedule(opt, num_train_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if kind == 'stable_adamw':
    core = stable_adamw(schedule, opt.b1, opt.b2, opt.eps, opt.weight_decay, decay_mask)
  else:
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
  tx = optax.chain(clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity(), core)
  layer_decay = opt.get('layer_decay')
  if layer_decay is None or layer_decay == 1.0:
    return tx
  scales = layer_scales(params, num_layers, layer_decay)
  return optax.chain(tx, optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates, scales)))
