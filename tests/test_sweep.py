"""Sweeps (`mlm-flax sweep`), `mlm-flax compare`, TensorBoard HParams, W&B's missing-package error and warm
starts (`init_from`)."""

import contextlib
import csv
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from mlm_flax import checkpoint, compare, inference, sweep, train, validation, writers
from mlm_flax.models import make_model

CLI = [sys.executable, '-m', 'mlm_flax.cli']
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'tiny.py')
# A few steps of a one-layer model: every step logs, evaluates (2 batches) and checkpoints at the end.
OVERRIDES = ['--config.num_train_steps=2', '--config.batch_size=8', '--config.eval_batch_size=16',
             '--config.max_seq_length=32', '--config.log_every_steps=2', '--config.eval_every_steps=2',
             '--config.checkpoint_every_steps=2', '--config.max_eval_batches=2', '--config.fill_mask_examples=0',
             '--config.progress_bar=False', '--config.model.num_layers=1', '--config.model.hidden_size=32',
             '--config.model.num_heads=4', '--config.model.intermediate_size=64',
             '--config.model.max_position_embeddings=64', '--config.data.tokenizer_vocab_size=500',
             '--config.optimizer.warmup_steps=1']


def _cli(*args, timeout=900):
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  """A 2-point sweep (learning rate) of 2-step tiny runs, run once: (root, the sweep's process)."""
  tmp = tmp_path_factory.mktemp('sweep')
  root = str(tmp / 'root')
  proc = _cli('sweep', f'--config={TINY}', '--sweep=optimizer.learning_rate=1e-3,3e-3', f'--workdir={root}',
              *OVERRIDES, f'--config.data.cache_dir={tmp / "cache"}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return root, proc


def test_points_are_named_from_their_overrides_and_stable(tmp_path):
  """--dry_run lists the 2 x 2 x 2-seed grid: readable names (the overrides, sorted), the same for any flag
  order, and each point's command; a sweep file gives the points it returns; clear errors."""
  a = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,3e-3', 'batch_size=8,16'], seeds=2)
  b = sweep.make_sweep('train', TINY, ['batch_size=8,16', 'optimizer.learning_rate=1e-3,3e-3'], seeds=2)
  names = [p.name for p in a.points]
  assert len(set(names)) == 8 and sorted(names) == sorted(p.name for p in b.points)
  assert 'tiny-batch_size=16+optimizer.learning_rate=3e-3+seed=1' in names
  proc = _cli('sweep', f'--config={TINY}', '--sweep=optimizer.learning_rate=1e-3,3e-3', '--sweep=batch_size=8,16',
              '--seeds=2', f'--workdir={tmp_path / "root"}', '--config.num_train_steps=5', '--dry_run', '--',
              '--init', 'a model')  # arguments after `--` go to every point
  assert proc.returncode == 0, proc.stderr
  listed = [l.split('] ', 1)[1].split(' (')[0] for l in proc.stdout.splitlines() if l.startswith('[')]
  assert listed == names
  command = shlex.split(proc.stdout.splitlines()[1])
  assert command[:2] == ['mlm-flax', 'train'] and f'--workdir={tmp_path / "root" / names[0]}' in command
  assert '--config.num_train_steps=5' in command and '--config.seed=0' in command
  assert command[-2:] == ['--init', 'a model']
  assert not os.path.exists(tmp_path / 'root')  # a dry run writes nothing

  grid_file = tmp_path / 'grid.py'
  grid_file.write_text('def get_sweep():\n  return [{"batch_size": 8}, {"batch_size": 16, "masking.rate": 0.3}]\n')
  c = sweep.make_sweep('train', TINY, [str(grid_file)], seeds=1)
  assert [p.overrides for p in c.points] == [{'batch_size': '8', 'seed': '0'},
                                             {'batch_size': '16', 'masking.rate': '0.3', 'seed': '0'}]
  with pytest.raises(ValueError, match='swept twice'):
    sweep.make_sweep('train', TINY, ['seed=1,2'], seeds=2)
  with pytest.raises(ValueError, match='both swept and set'):
    sweep.make_sweep('train', TINY, ['batch_size=8,16'], overrides=['--config.batch_size=4'])
  bad = _cli('sweep', f'--config={TINY}', '--sweep=optimizer.learnin_rate=1,2', '--dry_run')
  assert bad.returncode == 2 and "Did you mean 'learning_rate'" in bad.stderr


def test_equal_values_written_differently_are_one_point():
  with pytest.raises(ValueError, match='two points have the same overrides'):
    sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,0.001'])
  with pytest.raises(ValueError, match='two points have the same overrides'):
    sweep.make_sweep('train', TINY, ['progress_bar=false,False'])
  assert len(sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,1e-4']).points) == 2


def test_compare_names_finetuning_metrics_best(tmp_path):
  """A fine-tuning run's results.json metrics are its best step's (`best_*`)."""
  run = tmp_path / 'root' / 'ft'
  run.mkdir(parents=True)
  (run / 'config.json').write_text(json.dumps({'task': {'type': 'classification'}, 'seed': 0}))
  (run / 'results.json').write_text(json.dumps({'task': 'classification', 'best_step': 16,
                                                'metrics': {'accuracy': 0.9, 'test_accuracy': 0.8}}))
  metrics, _ = compare.run_metrics(str(run))
  assert metrics == {'step': 16, 'best_accuracy': 0.9, 'best_test_accuracy': 0.8}


def test_corrupt_json_files_are_named_with_the_fix(tmp_path):
  run = tmp_path / 'root' / 'ft'
  run.mkdir(parents=True)
  (run / 'config.json').write_text(json.dumps({'seed': 0}))
  (run / 'results.json').write_text(json.dumps({'task': 'classification', 'metrics': {'accuracy': 0.9}}))
  _corrupt_json_files_are_named(tmp_path, run)


def _corrupt_json_files_are_named(tmp_path, run):
  for name, where in (('results.json', run), ('config.json', run), ('sweep.json', tmp_path / 'root')):
    path = where / name
    good = path.read_text() if path.exists() else json.dumps({'points': [{'name': 'ft', 'overrides': {}}]})
    path.write_text(good[:-3])  # cut short
    with pytest.raises(ValueError, match=f'{path} is not valid JSON .*; (restore|delete) it'):
      compare.compare([str(tmp_path / 'root')])
    path.write_text(good)
  (tmp_path / 'root' / 'sweep.json').write_text('{')
  with pytest.raises(ValueError, match='sweep.json is not valid JSON .*; delete it to record this sweep anew'):
    sweep.run(sweep.make_sweep('train', TINY, ['seed=1']), str(tmp_path / 'root'), dry_run=True)


def test_slurm_emission_and_a_changed_grid(tmp_path):
  """--emit slurm writes an array job (one index per point, the local sweep's commands and workdirs) and
  commands.txt; index i runs point i. A rerun may add points, never drop or change them."""
  root = str(tmp_path / 'root')
  plan = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,3e-3', 'batch_size=8,16'], seeds=2,
                          overrides=['--config.num_train_steps=5'], args=['--init', 'some model'])
  assert sweep.run(plan, root, emit_kind='slurm') == 0
  script = _read(os.path.join(root, 'sweep.sbatch')).decode()
  commands = _read(os.path.join(root, 'commands.txt')).decode().splitlines()
  assert '#SBATCH --array=0-7\n' in script and len(commands) == 8
  for p, line in zip(plan.points, commands):
    assert shlex.split(line) == ['mlm-flax', *plan.argv(p, root)]
    assert shlex.quote(line) in script
  assert json.loads(_read(os.path.join(root, 'sweep.json')))['points'][3]['name'] == plan.points[3].name
  subprocess.run(['bash', '-n', os.path.join(root, 'sweep.sbatch')], check=True)
  bin_dir = tmp_path / 'bin'  # a stand-in `mlm-flax` that records its arguments: which point index 5 runs
  bin_dir.mkdir()
  (bin_dir / 'mlm-flax').write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
  (bin_dir / 'mlm-flax').chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_ARRAY_TASK_ID': '5'}
  subprocess.run(['bash', os.path.join(root, 'sweep.sbatch')], check=True, env=env, capture_output=True)
  assert _read(tmp_path / 'args').decode().splitlines() == plan.argv(plan.points[5], root)

  more = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,3e-3,1e-2', 'batch_size=8,16'], seeds=2,
                          overrides=['--config.num_train_steps=5'], args=['--init', 'some model'])
  assert sweep.run(more, root, emit_kind='commands') == 0  # only adds points: accepted, recorded
  assert len(json.loads(_read(os.path.join(root, 'sweep.json')))['points']) == 12
  fewer = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3', 'batch_size=8,16'], seeds=2,
                           overrides=['--config.num_train_steps=5'], args=['--init', 'some model'])
  with pytest.raises(ValueError, match='may only add points'):
    sweep.run(fewer, root, dry_run=True)
  other = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,3e-3,1e-2', 'batch_size=8,16'], seeds=2,
                           overrides=['--config.num_train_steps=6'], args=['--init', 'some model'])
  with pytest.raises(ValueError, match='holds another sweep'):
    sweep.run(other, root)


def test_sweep_runs_each_point_once(swept):
  """Both points ran to the end in their own workdirs; the same command again starts no run (no new rows)."""
  root, first = swept
  names = json.loads(_read(os.path.join(root, 'sweep.json')))['points']
  assert [p['name'] for p in names] == ['tiny-optimizer.learning_rate=1e-3', 'tiny-optimizer.learning_rate=3e-3']
  before = {}
  for p in names:
    workdir = os.path.join(root, p['name'])
    assert sweep.finished(workdir) and sweep.last_checkpoint(workdir) == 2
    config = json.loads(_read(os.path.join(workdir, 'config.json')))
    assert config['optimizer']['learning_rate'] == float(p['overrides']['optimizer.learning_rate'])
    before[workdir] = _read(os.path.join(workdir, 'metrics.jsonl'))
  assert first.stdout.count('Workdir: ') == 2 and 'All 2 points finished' in first.stdout
  again = _cli('sweep', f'--config={TINY}', '--sweep=optimizer.learning_rate=1e-3,3e-3', f'--workdir={root}',
               *OVERRIDES, f'--config.data.cache_dir={os.path.join(os.path.dirname(root), "cache")}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('skipped (finished)') == 2 and 'Workdir: ' not in again.stdout
  assert all(_read(os.path.join(w, 'metrics.jsonl')) == rows for w, rows in before.items())


def _eval_rows(workdir):
  return [json.loads(l) for l in _read(os.path.join(workdir, 'metrics.jsonl')).decode().splitlines()
          if json.loads(l)['split'] == 'eval']


def test_compare_table_seeds_csv_and_plot(swept, tmp_path):
  """compare: the differing key and final/best eval metrics of each run; two planted seed copies of a run
  (metrics changed) are summarised as mean ± std; CSV and plot written."""
  root, _ = swept
  a, b = (os.path.join(root, n) for n in ('tiny-optimizer.learning_rate=1e-3', 'tiny-optimizer.learning_rate=3e-3'))
  headers, rows, _ = compare.table([a, b])
  assert headers[:3] == ['run', 'optimizer.learning_rate', 'step']
  assert [r[1] for r in rows] == [1e-3, 3e-3] and [r[2] for r in rows] == [2, 2]
  for row, workdir in zip(rows, (a, b)):
    final = _eval_rows(workdir)[-1]
    assert row[headers.index('final_masked_accuracy')] == final['masked_accuracy']
    assert row[headers.index('final_loss')] == final['loss']

  seeds = tmp_path / 'seeds'  # b's run under seeds 1 and 2, with planted eval accuracies 0.2 and 0.4
  for seed, acc in ((1, 0.2), (2, 0.4)):
    d = seeds / f'seed{seed}'
    d.mkdir(parents=True)
    config = json.loads(_read(os.path.join(b, 'config.json')))
    config['seed'] = seed
    (d / 'config.json').write_text(json.dumps(config))
    (d / 'metrics.jsonl').write_text(''.join(json.dumps({**r, 'masked_accuracy': acc - 0.1 * (r['step'] < 2)})
                                             + '\n' for r in _eval_rows(b)))
  out_csv, out_png = tmp_path / 'runs.csv', tmp_path / 'curves.png'
  proc = _cli('compare', root, str(seeds), f'--csv={out_csv}', f'--plot={out_png}', timeout=300)
  assert proc.returncode == 0, proc.stderr
  table, summary = proc.stdout.split('Mean ± std over seeds:')
  assert table.count('| tiny-optimizer.learning_rate=') == 2 and '| seed1 | 0.003 | 1 | 2 |' in table
  assert '| 0.2 | 0.2 |' in table  # seed1's planted final and best masked accuracy
  assert '| run | optimizer.learning_rate | seed | step | final_loss |' in table
  accs = [_eval_rows(b)[-1]['masked_accuracy'], 0.2, 0.4]  # b (seed 0) and its two planted seeds; sample std
  row = next(l for l in summary.splitlines() if l.startswith('| 0.003 | 3 |'))
  assert f'| {np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f} |' in row
  with open(out_csv) as f:
    got = list(csv.DictReader(f))
  assert [r['run'] for r in got] == [os.path.basename(a), os.path.basename(b), 'seed1', 'seed2']
  assert float(got[3]['final_masked_accuracy']) == pytest.approx(0.4)
  assert _read(out_png)[:8] == b'\x89PNG\r\n\x1a\n'


def _events(folder):
  """The Event protos of the TensorBoard event files in `folder` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(os.listdir(folder)):
    data = _read(os.path.join(folder, name))
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
      i += 12 + n + 4
  return out


def test_every_run_writes_tensorboard_hparams(swept):
  """Each finished run's tensorboard/hparams holds an HParams session: its config keys (the swept one with
  its value) and the final eval metrics, equal to the last eval row."""
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  root, _ = swept
  for name, lr in (('tiny-optimizer.learning_rate=1e-3', 1e-3), ('tiny-optimizer.learning_rate=3e-3', 3e-3)):
    workdir = os.path.join(root, name)
    events = _events(os.path.join(workdir, 'tensorboard', writers.HPARAMS_RUN))
    values = [v for e in events for v in e.summary.value]
    plugin = {v.tag: plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
              for v in values if v.metadata.plugin_data.plugin_name == 'hparams'}
    session = plugin['_hparams_/session_start_info'].session_start_info.hparams
    assert session['optimizer.learning_rate'].number_value == pytest.approx(lr)
    assert session['model.hidden_size'].number_value == 32 and session['optimizer.schedule'].string_value == 'linear'
    experiment = plugin['_hparams_/experiment'].experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {'final/eval_loss', 'final/eval_masked_accuracy'}
    scalars = {v.tag: v.simple_value for v in values if v.tag.startswith('final/')}
    assert scalars['final/eval_loss'] == pytest.approx(_eval_rows(workdir)[-1]['loss'])


def test_wandb_without_the_package_is_a_clear_error(config):
  if sweep.importlib.util.find_spec('wandb') is not None:
    pytest.skip('wandb is installed')
  config.logging.wandb = True
  with pytest.raises(ValueError, match=r'pip install -e "\.\[wandb\]"'):
    validation.validate_config(config, 1)


def _params(workdir, step=None):
  config = ml_collections.ConfigDict(json.loads(_read(os.path.join(workdir, 'config.json'))))
  ckpt = checkpoint.Checkpointer(workdir, create=False, async_save=False)
  params, _ = ckpt.restore_params(inference.abstract_params(make_model(config.model)), step)
  ckpt.close()
  return params


def test_init_from_starts_from_the_params_with_a_fresh_optimizer(swept, tmp_path):
  """init_from=WORKDIR:STEP: the run starts at step 0 from the source's params and tokenizer with a fresh
  optimizer (train's own set-up, no step compiled); once the run has a checkpoint, resuming takes that one.
  Mismatching shapes and a missing step are refused."""
  source = os.path.join(swept[0], 'tiny-optimizer.learning_rate=3e-3')
  config = ml_collections.ConfigDict(json.loads(_read(os.path.join(source, 'config.json'))))
  config.init_from = f'{source}:2'
  workdir = str(tmp_path / 'warm')
  with contextlib.ExitStack() as on_exit:
    run = train._set_up(config, workdir, on_exit)
    state = run.state
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, _params(source, 2))
    fresh = train.make_optimizer(config.optimizer, config.num_train_steps).init(state.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh)  # Adam count 0, moments 0
    assert _read(os.path.join(workdir, 'tokenizer', 'tokenizer.json')) == _read(
        os.path.join(source, 'tokenizer', 'tokenizer.json'))
    assert json.loads(_read(os.path.join(workdir, 'config.json')))['init_from'] == f'{source}:2'
    own = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1, state.params))
    run.ckpt.save(1, own, {'step': 1, 'data_position': None})
    run.writer.close()
  with contextlib.ExitStack() as on_exit:
    resumed = train._set_up(config, workdir, on_exit).state
  assert int(resumed.step) == 1
  jax.tree.map(np.testing.assert_array_equal, resumed.params, own.params)

  target = inference.abstract_params(make_model(config.model))
  with pytest.raises(ValueError, match='no checkpoint of step 5'):
    train.warm_start_params(ml_collections.ConfigDict({**config.to_dict(), 'init_from': f'{source}:5'}), target)
  wider = ml_collections.ConfigDict(config.to_dict())
  wider.model.hidden_size, wider.model.intermediate_size = 64, 128
  with pytest.raises(ValueError, match=r'do not fit this model .*model\.hidden_size: 32 there, 64 here'):
    train.warm_start_params(wider, inference.abstract_params(make_model(wider.model)))


def _wait_for(predicate, proc, timeout=1200):
  """Polls `predicate` until it holds (the sweep still running); fails on timeout."""
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, 'the sweep ended before the awaited state'
    assert time.time() < deadline, 'timed out waiting for the sweep'
    time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_sweep_resumes(tmp_path):
  """A 2 x 2 sweep with 2 seeds, SIGTERM-ed once its first point finished and the second has a checkpoint:
  run again, the finished point is not rerun (metrics.jsonl unchanged), the interrupted one resumes, the rest
  run; compare prints the table (and the mean ± std over seeds) and writes the plot."""
  root = str(tmp_path / 'root')
  longer = {'num_train_steps': 30, 'log_every_steps': 5, 'eval_every_steps': 10, 'checkpoint_every_steps': 2}
  overrides = [o for o in OVERRIDES if o[len('--config.'):].split('=')[0] not in (*longer, 'batch_size')]
  args = ['sweep', f'--config={TINY}', '--sweep=optimizer.learning_rate=1e-3,3e-3', '--sweep=batch_size=8,16',
          '--seeds=2', f'--workdir={root}', *overrides, *(f'--config.{k}={v}' for k, v in longer.items()),
          f'--config.data.cache_dir={tmp_path / "cache"}']
  plan = sweep.make_sweep('train', TINY, ['optimizer.learning_rate=1e-3,3e-3', 'batch_size=8,16'], seeds=2)
  first, second = (os.path.join(root, p.name) for p in plan.points[:2])
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  with open(tmp_path / 'log1', 'w') as log:
    proc = subprocess.Popen(CLI + args, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(lambda: sweep.finished(first) and sweep.last_checkpoint(second) is not None, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM
  stopped_at = sweep.last_checkpoint(second)
  assert not sweep.finished(second) and 2 <= stopped_at < 30
  assert not any(os.path.exists(os.path.join(root, p.name)) for p in plan.points[2:])
  rows = _read(os.path.join(first, 'metrics.jsonl'))

  again = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=3600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert f'[1/8] {plan.points[0].name}: skipped (finished)' in again.stdout
  assert f'[2/8] {plan.points[1].name}: resumes from step {stopped_at}' in again.stdout
  assert again.stdout.count('Resumed from ') == 1 and again.stdout.count('Workdir: ') == 7
  assert _read(os.path.join(first, 'metrics.jsonl')) == rows
  assert all(sweep.finished(os.path.join(root, p.name)) for p in plan.points)

  out = _cli('compare', root, f'--plot={tmp_path / "sweep.png"}', timeout=300)
  assert out.returncode == 0, out.stderr
  print(out.stdout)
  table, summary = out.stdout.split('Mean ± std over seeds:')
  assert table.count('| tiny-batch_size=') == 8 and summary.count(' ± ') == 4 * 4
  assert _read(tmp_path / 'sweep.png')[:4] == b'\x89PNG'
  emitted = _cli('sweep', *args[1:], '--emit=slurm')
  assert emitted.returncode == 0, emitted.stderr
  print(_read(os.path.join(root, 'sweep.sbatch')).decode())
