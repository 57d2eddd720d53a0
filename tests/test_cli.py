"""The `mlm-flax` command line: kill-and-resume equals an uninterrupted run; clean errors; JSON outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mlm_flax import cli, inference

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


_WALL_CLOCK = ('wall_seconds', 'tokens_per_second', 'mfu')


def _metric_rows(workdir):
  """metrics.jsonl rows without wall-clock fields (time, speed, MFU); a half-written last line reads as None."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  rows = []
  for line in lines:
    try:
      rows.append({k: v for k, v in json.loads(line).items() if k not in _WALL_CLOCK})
    except ValueError:
      rows.append(None)
  return rows


def _steps_on_disk(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _saving(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any('orbax-checkpoint-tmp' in n for n in os.listdir(d))


def _logged(workdir, split, step):
  return any(r and r['split'] == split and r['step'] >= step for r in _metric_rows(workdir))


def _interrupt(workdir, when, sig=signal.SIGKILL):
  """Runs `train` on `workdir` and sends `sig` as soon as `when(workdir)` holds; returns (rc, stdout)."""
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  with open(os.path.join(workdir + '.log'), 'w') as log:
    proc = subprocess.Popen(CLI + ['train', f'--workdir={workdir}'] + OVERRIDES, env=env, stdout=log,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not when(workdir):
      time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=600)
  with open(workdir + '.log') as f:
    return proc.returncode, f.read()


def test_interrupted_runs_resume_to_the_same_result(tmp_path):
  """SIGKILL while a save is being written, SIGTERM right after a save, SIGKILL during an eval: running the
  same command again each time ends with the uninterrupted run's params and metrics."""
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  ref = _run('train', f'--workdir={full}', *OVERRIDES)
  assert ref.returncode == 0, ref.stderr[-3000:]
  final = _last_json(ref.stdout)
  assert final['step'] == STEPS
  examples = ref.stdout.split('Fill-mask on held-out sentences:')[1]
  assert examples.count('[MASK]') == 2 and examples.count('->') == 2  # fill_mask_examples=2

  # 1. SIGKILL while the first checkpoint is being written (its temporary folder exists).
  rc, _ = _interrupt(killed, lambda w: _saving(w) or _steps_on_disk(w))
  assert rc == -signal.SIGKILL and max(_steps_on_disk(killed), default=0) < STEPS
  # 2. SIGTERM once step 10's checkpoint is finalised (usually a step or two later, between logs: the
  #    checkpoint then carries the metrics of the unlogged steps): saves at that step, exits 0.
  rc, out = _interrupt(killed, lambda w: max(_steps_on_disk(w), default=0) >= 10, signal.SIGTERM)
  assert rc == 0, out[-2000:]
  preempted = int(out.split('Preempted at step ')[1].split(';')[0])
  assert 10 <= preempted < STEPS and 'run the same command to resume' in out
  assert max(_steps_on_disk(killed)) == preempted and _last_json(out) == {'step': preempted, 'preempted': True}
  # 3. SIGKILL during the eval at step 20 (it starts right after the train row of step 20 is written).
  rc, _ = _interrupt(killed, lambda w: _logged(w, 'train', 20))
  assert rc == -signal.SIGKILL and max(_steps_on_disk(killed)) < STEPS

  resumed = _run('train', f'--workdir={killed}', *OVERRIDES)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  assert _last_json(resumed.stdout) == final
  assert _metric_rows(killed) == _metric_rows(full)  # every row once, none half-written, same values
  a, b = inference.load(full), inference.load(killed)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)))
  print(f'3 interruptions (preempted at step {preempted}); params max abs diff {diff}')
  assert diff == 0.0
  ckpt_dir = os.path.join(killed, 'checkpoints')
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


def test_default_workdir_names_the_overrides():
  tiny = '/somewhere/configs/tiny.py'
  assert cli.default_workdir(tiny, {}) == 'workdirs/tiny'  # the quick start's folder
  a = cli.default_workdir(tiny, {'optimizer.learning_rate': 3e-4, 'batch_size': 32})
  assert a == 'workdirs/tiny-batch_size=32+optimizer.learning_rate=0.0003'
  assert cli.default_workdir(tiny, {'batch_size': 32, 'optimizer.learning_rate': 3e-4}) == a  # any order
  assert cli.default_workdir(tiny, {'batch_size': 16}) != cli.default_workdir(tiny, {'batch_size': 32})
  assert cli.default_workdir('configs/bert_base.py:x', {'seed': 1}) == 'workdirs/bert_base-seed=1'
  unsafe = [cli.default_workdir(tiny, {'data.train_files': p}) for p in ('/data/a b/*.txt', '/data/a_b/?.txt')]
  long = cli.default_workdir(tiny, {f'model.key{i}': 10 ** i for i in range(20)})
  for name in unsafe + [long]:
    suffix = name[len('workdirs/tiny-'):]
    assert all(ch.isalnum() or ch in '._=+-' for ch in suffix) and len(suffix) <= 71, name
  assert unsafe[0] != unsafe[1]  # replaced characters: the hash keeps them apart
  assert long.startswith('workdirs/tiny-model.key0=1+model.key1=10+')
  assert long != cli.default_workdir(tiny, {f'model.key{i}': 10 ** i for i in range(21)})


def test_a_jax_only_install_gets_no_pytorch_advice_from_transformers():
  """Without torch, `import transformers` advises that PyTorch was not found; our CLI (JAX models, transformers
  for tokenizers) silences it. Torch is hidden with sys.modules['torch'] = None (find_spec then finds nothing)."""
  env = {k: v for k, v in os.environ.items() if k != 'TRANSFORMERS_NO_ADVISORY_WARNINGS'}
  hide = "import sys; sys.modules['torch'] = None; "
  run = lambda code: subprocess.run([sys.executable, '-c', hide + code], capture_output=True, text=True, env=env,
                                    timeout=300)
  plain = run('import transformers')
  assert 'PyTorch was not found' in plain.stderr  # the shim works: transformers sees no torch
  ours = run('import mlm_flax.cli; import transformers; from mlm_flax.data import tokenizer')
  assert ours.returncode == 0 and 'PyTorch was not found' not in ours.stderr + ours.stdout, ours.stderr
