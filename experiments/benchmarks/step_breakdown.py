"""Where the training step's time goes: the step cut into nested parts, each jitted and timed alone.

    python experiments/benchmarks/step_breakdown.py [--size small] [--seq 128] [--rounds 3]

Parts, each containing the one before (differences are what the added piece costs):
  matmuls      the step's matmuls alone (every dense, attention and head dot, forward and both backward
               dots, as three [m,k]x[k,n] products per forward dot), the floor at this machine's speed
  forward      masking + forward + loss
  grad         + backward (value_and_grad)
  step         + AdamW, the non-finite guard (`train.jit_train_step`, what `mlm-flax train` runs)
and `step, no dropout` (dropout's random bits cost). Writes results/step_breakdown.{json,md}.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE, os.path.join(HERE, 'workers')]

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mlm_flax.configs import default  # pylint: disable=wrong-import-position
from mlm_flax import flops, parallel, train  # pylint: disable=wrong-import-position
from mlm_flax.objectives import masking  # pylint: disable=wrong-import-position
from mlm_flax.objectives import mlm as loss  # pylint: disable=wrong-import-position
from mlm_flax.models import make_model  # pylint: disable=wrong-import-position
import common  # pylint: disable=wrong-import-position
from train_step import SIZES, VOCAB  # pylint: disable=wrong-import-position


def matmul_shapes(s: dict, tokens: int, batch: int, seq: int, preds: int) -> list[tuple]:
  """(batch dims, m, k, n) of every forward dot of the step."""
  h, f, heads = s['hidden'], s['ffn'], s['heads']
  layer = [((), tokens, h, h)] * 4 + [((), tokens, h, f), ((), tokens, f, h),
                                      ((batch * heads,), seq, h // heads, seq), ((batch * heads,), seq, seq, h // heads)]
  return layer * s['layers'] + [((), batch * preds, h, h), ((), batch * preds, h, VOCAB)]


def matmul_floor(shapes: list[tuple]):
  """A jitted function doing each forward dot a @ w and its two backward dots g @ w^T, a^T @ g."""
  arrays = [tuple(jnp.ones((*b, *shape), jnp.float32) for shape in ((m, k), (k, n), (m, n)))
            for b, m, k, n in shapes]
  t = lambda x: jnp.swapaxes(x, -1, -2)

  @jax.jit
  def run(arrays):
    return sum(jnp.sum(a @ w) + jnp.sum(g @ t(w)) + jnp.sum(t(a) @ g) for a, w, g in arrays)
  return lambda: run(arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='small', choices=SIZES)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--tokens_per_step', type=int, default=4096)
  parser.add_argument('--repeats', type=int, default=3, help='timed calls per part per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  args = parser.parse_args()
  s, seq = SIZES[args.size], args.seq
  batch = args.tokens_per_step // seq
  preds = masking.max_predictions(seq, 0.15)

  def build(dropout: float):
    c = default.get_config()
    c.model.update(num_layers=s['layers'], hidden_size=s['hidden'], num_heads=s['heads'], intermediate_size=s['ffn'],
                   vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=max(512, seq),
                   hidden_dropout=dropout, attention_dropout=dropout)
    model = make_model(c.model)
    tx = train.make_optimizer(c.optimizer, 10_000)
    mesh = parallel.make_mesh()
    mask_fn = functools.partial(masking.mask_tokens, vocab_size=VOCAB, mask_id=common.MASK_ID,
                                special_ids=common.SPECIALS, pad_id=0, rate=0.15)
    state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=seq),
                    out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
    ones = np.ones((batch, seq), np.int32)
    ids = np.random.default_rng(0).integers(max(common.SPECIALS) + 1, VOCAB, (batch, seq)).astype(np.int32)
    data = parallel.to_global({'input_ids': ids, 'segment_ids': ones,
                               'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), ones.shape)}, mesh)
    return model, tx, mesh, mask_fn, state, data

  model, tx, mesh, mask_fn, state, data = build(0.1)
  rng = jax.random.PRNGKey(1)

  def loss_fn(params, rng):
    masked = mask_fn(rng, data['input_ids'], maskable=data['segment_ids'] > 0)
    return loss.mlm_loss(params, model, data, masked, preds, rng)[0]

  forward = jax.jit(loss_fn)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  step = train.jit_train_step(model, tx, mask_fn, preds, mesh)
  holder = {'state': state}

  def run_step(fn, h):
    h['state'], metrics = fn(h['state'], data)
    return metrics

  model0, _, _, _, state0, _ = build(0.0)
  step0 = train.jit_train_step(model0, tx, mask_fn, preds, mesh)
  holder0 = {'state': state0}
  parts = {
      'matmuls': matmul_floor(matmul_shapes(s, batch * seq, batch, seq, preds)),
      'forward': lambda: forward(holder['state'].params, rng),
      'grad': lambda: grad(holder['state'].params, rng),
      'step': lambda: run_step(step, holder),
      'step, no dropout': lambda: run_step(step0, holder0),
  }
  times = {k: [] for k in parts}
  for fn in parts.values():
    jax.block_until_ready(fn())  # compile
  for r in range(args.rounds):
    for name, fn in (list(parts.items())[r % 2::] + list(parts.items())[:r % 2]):
      start = time.perf_counter()
      for _ in range(args.repeats):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / args.repeats)
  med = {k: statistics.median(v) for k, v in times.items()}
  fpt = flops.train_flops_per_token(s['layers'], s['hidden'], s['ffn'], VOCAB, seq, 0.15)
  peak = flops.measure_matmul_peak('float32')
  lines = [f"{args.size}, seq {seq} x batch {batch}, f32; matmul peak {peak / 1e9:.0f} GFLOP/s; model FLOPs/step "
           f"{fpt * batch * seq / 1e9:.0f} G (ideal {fpt * batch * seq / peak:.2f} s at that peak)", '',
           '| part | seconds | share of the step |', '|---|---:|---:|']
  lines += [f'| {k} | {v:.3f} | {v / med["step"]:.0%} |' for k, v in med.items()]
  table = '\n'.join(lines) + '\n'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'step_breakdown.json'), 'w') as f:
    json.dump({'args': vars(args), 'seconds': times, 'median': med, 'peak_flops': peak,
               'model_flops_per_step': fpt * batch * seq}, f, indent=2)
  with open(os.path.join(args.out, 'step_breakdown.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()
