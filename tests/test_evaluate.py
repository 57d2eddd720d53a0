"""Evaluation masks are a function of (seed, row of the split): the same sums for any eval batch size and
device count."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from mlm_flax import evaluate, parallel
from mlm_flax.objectives import mlm
from test_train import random_batch, setup

_DEVICES = r'''
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, sys.argv[1])
import jax
from test_evaluate import evaluate_rows
assert len(jax.devices()) == 8, jax.devices()
print(json.dumps({f'{n}x{b}': evaluate_rows(n, b) for n in (1, 8) for b in (8, 64)}))
'''


def eval_rows(n: int = 100) -> dict[str, np.ndarray]:
  """`n` packed rows (two documents each, padded ends): not a multiple of the batch sizes."""
  batches = [random_batch(i) for i in range(-(-n // 16))]
  return {k: np.concatenate([b[k] for b in batches])[:n] for k in batches[0]}


def evaluate_rows(num_devices: int, batch_size: int) -> dict:
  mesh = parallel.make_mesh(num_devices)
  model, _, mask_fn, num_predictions, state = setup(mesh, dropout=0.1)  # eval never drops out
  evaluator = evaluate.Evaluator(mlm.MLM(model, mask_fn, num_predictions, baseline_token=7), mesh, seed=0)
  return evaluator(state.params, eval_rows(), batch_size)


def _assert_same(a: dict, b: dict) -> None:
  assert a['num_masked_tokens'] == b['num_masked_tokens'] > 0
  for key in ('masked_accuracy', 'unigram_baseline_accuracy'):  # ratios of exact integer sums
    assert a[key] == b[key], key
  np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6)


def test_eval_sums_do_not_depend_on_the_eval_batch_size():
  small, large = evaluate_rows(1, 8), evaluate_rows(1, 64)
  _assert_same(small, large)
  assert small['unigram_baseline_accuracy'] > 0  # the masks picked real tokens, seen through the same keys
  assert evaluate_rows(1, 8) == small  # and exactly repeatable


def test_eval_mask_of_a_row_depends_only_on_its_row_id():
  rows = eval_rows(16)
  can = rows['segment_ids'] > 0
  _, _, mask_fn, _, _ = setup(parallel.make_mesh(1))
  rng = jax.random.PRNGKey(3)
  full = evaluate.mask_rows(mask_fn, rng, np.arange(16), rows['input_ids'], can)
  part = evaluate.mask_rows(mask_fn, rng, np.asarray([9, 4]), rows['input_ids'][[9, 4]], can[[9, 4]])
  for a, b in zip(full, part):
    np.testing.assert_array_equal(np.asarray(a)[[9, 4]], np.asarray(b))
  assert (np.asarray(full.weights).sum(-1) > 0).all()  # every row had masks


def test_eval_sums_do_not_depend_on_the_device_count():
  here = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, '-c', _DEVICES, here], capture_output=True, text=True, env=env,
                        cwd=here, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for key, result in out.items():
    _assert_same(result, out['1x8'])


def test_on_cpu_evaluation_waits_for_each_batch_before_the_next():
  """`parallel.steps_queued()` is 0 on CPU: a batch is dispatched once the previous one is done (queued XLA:CPU
  executions set up their buffers side by side), and the sums stay those of the whole split."""
  mesh = parallel.make_mesh(1)
  model, _, mask_fn, num_predictions, state = setup(mesh)
  evaluator = evaluate.Evaluator(mlm.MLM(model, mask_fn, num_predictions, baseline_token=7), mesh, seed=0)
  jitted, dispatched, ready_at_dispatch = evaluator.step, [], []

  def step(*args):
    ready_at_dispatch.append(all(x.is_ready() for out in dispatched for x in jax.tree.leaves(out)))
    dispatched.append(jitted(*args))
    return dispatched[-1]

  evaluator.step = step
  result = evaluator(state.params, eval_rows(), 8)
  assert len(ready_at_dispatch) == 13 and all(ready_at_dispatch)
  assert result == evaluate_rows(1, 8)
