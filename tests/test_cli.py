"""The `mlm-flax` command line: kill-and-resume equals an uninterrupted run; clean errors; JSON outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mlm_flax import inference, writers

STEPS = 40
OVERRIDES = [
    f'--config.num_train_steps={STEPS}', '--config.batch_size=8', '--config.eval_batch_size=16',
    '--config.max_seq_length=32', '--config.log_every_steps=5', '--config.eval_every_steps=20',
    '--config.checkpoint_every_steps=5', '--config.fill_mask_examples=2', '--config.progress_bar=False',
    '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=4',
    '--config.model.intermediate_size=64', '--config.model.max_position_embeddings=64',
    '--config.model.hidden_dropout=0.1', '--config.data.tokenizer_vocab_size=1000',
    '--config.optimizer.warmup_steps=5', '--config.max_checkpoints_to_keep=2']
CLI = [sys.executable, '-m', 'mlm_flax.cli']


def _run(*args, **kw):
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=900, **kw)


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def test_killed_run_resumes_to_the_same_result(tmp_path):
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  ref = _run('train', f'--workdir={full}', *OVERRIDES)
  assert ref.returncode == 0, ref.stderr[-3000:]
  final = _last_json(ref.stdout)
  assert final['step'] == STEPS
  examples = ref.stdout.split('Fill-mask on held-out sentences:')[1]
  assert examples.count('[MASK]') == 2 and examples.count('->') == 2  # fill_mask_examples=2

  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  proc = subprocess.Popen(CLI + ['train', f'--workdir={killed}'] + OVERRIDES, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 10 for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert proc.returncode == -signal.SIGKILL and steps and max(steps) < STEPS, (proc.returncode, steps)

  resumed = _run('train', f'--workdir={killed}', *OVERRIDES)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from' in resumed.stdout
  assert _last_json(resumed.stdout) == final
  def evals(workdir):  # wall-clock time aside, the eval history is identical
    return [{k: v for k, v in r.items() if k != 'wall_seconds'}
            for r in writers.read_metrics(workdir) if r['split'] == 'eval']
  assert evals(killed) == evals(full)
  a, b = inference.load(full), inference.load(killed)
  for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert len([d for d in os.listdir(ckpt_dir) if d.isdigit()]) == 2  # max_checkpoints_to_keep

  # eval and fill-mask on the result, as JSON.
  ev = _run('eval', f'--workdir={full}')
  assert ev.returncode == 0, ev.stderr[-3000:]
  ev = _last_json(ev.stdout)
  assert ev['step'] == STEPS and ev['masked_accuracy'] == pytest.approx(final['masked_accuracy'])
  fm = _run('fill-mask', f'--model={full}', '--top_k=3', 'the [MASK] of a file.')
  assert fm.returncode == 0, fm.stderr[-3000:]
  preds = json.loads(fm.stdout)
  assert len(preds) == 3 and preds[0]['score'] >= preds[1]['score'] >= preds[2]['score']
  assert '[MASK]' not in preds[0]['sequence']


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.mark.parametrize('args, message', [
    (['train', '--config.model.hiden_size=3'], "Did you mean 'hidden_size'"),
    (['train', '--config.optimiser.learning_rate=1'], 'Valid keys of config: batch_size'),
    (['train', '--config.batch_size=abc'], 'batch_size'),
    (['eval'], '--workdir'),
    (['fill-mask', '--model=/nonexistent', 'a [MASK]'], 'not an mlm_flax workdir'),
])
def test_errors_are_one_clear_line(args, message):
  out = _run(*args)
  assert out.returncode == 2
  assert message in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]
