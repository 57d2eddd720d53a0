"""A workdir holds one run: resuming refuses every config change that alters the run's maths (and allows
the rest); imported weights keep their architecture, take compute keys from the config, and resume."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import validation
from mlm_flax.models import config as model_config

CLI = [sys.executable, '-m', 'mlm_flax.cli']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600):
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)


def _saved(**changes):
  """tiny_config as config.json holds it after a run (tokenizer keys filled), with `changes` (dotted keys)."""
  c = tiny_config().to_dict()
  c['model'].update(vocab_size=1000, pad_token_id=0)
  for key, value in changes.items():
    node, _, leaf = key.rpartition('.')
    (c[node] if node else c)[leaf] = value
  return c


def _flat(tree, prefix=''):
  for k, v in tree.items():
    yield from _flat(v, f'{prefix}{k}.') if isinstance(v, dict) else [(f'{prefix}{k}', v)]


def _other(value):
  """A different value of the same kind."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  return 'other' if value is None else value + 'x'


def test_every_key_that_changes_the_maths_is_refused_with_old_and_new_values():
  old = _saved()
  free = set(validation.FREE_TO_CHANGE) | {'num_train_steps'}
  unused = {f'model.{k}' for k in model_config.unused_keys(old['model'])}  # BERT never reads local_attention
  refused = [k for k, _ in _flat(old) if k not in free | unused]
  assert {'seed', 'batch_size', 'max_seq_length', 'grad_accum_steps', 'masking.rate', 'masking.strategy',
          'optimizer.learning_rate', 'optimizer.warmup_steps', 'data.dataset', 'data.tokenizer_vocab_size',
          'model.hidden_size', 'model.hidden_dropout', 'model.vocab_size'} <= set(refused)
  for key in refused:
    value = dict(_flat(old))[key]
    with pytest.raises(ValueError) as e:
      validation.check_config_change(old, _saved(**{key: _other(value)}), '/runs/a')
    message = str(e.value)
    assert f'{key}: {value!r} -> {_other(value)!r}' in message, message
    assert '\n' not in message and 'use a new --workdir' in message and f'--config.{key}={value}' in message
  # Several changes: one error naming each.
  with pytest.raises(ValueError, match=r'batch_size: 8 -> 16, seed: 0 -> 1'):
    validation.check_config_change(old, _saved(seed=1, batch_size=16), '/runs/a')


def test_keys_that_leave_the_maths_alone_may_change():
  old = _saved()
  values = dict(_flat(old))
  assert {'log_every_steps', 'progress_bar', 'eval_batch_size', 'data.cache_dir', 'model.dtype', 'fsdp',
          'checkpoint_every_steps', 'max_checkpoints_to_keep', 'data.prefetch'} <= set(validation.FREE_TO_CHANGE)
  new = _saved(**{k: _other(values[k]) for k in validation.FREE_TO_CHANGE})
  assert validation.config_changes(old, new) == {}
  assert validation.check_config_change(old, new, '/runs/a') is None


def test_longer_run_is_allowed_with_a_warning_about_the_schedule():
  warning = validation.check_config_change(_saved(), _saved(num_train_steps=30), '/runs/a')
  assert warning.startswith('warning: num_train_steps changed from 12 to 30')
  assert 'learning-rate schedule' in warning and 'linear decay' in warning and '\n' not in warning


def test_tokenizer_filled_keys_left_unset_and_keys_of_older_versions_are_not_changes():
  old = _saved()
  new = _saved(**{'model.vocab_size': None, 'model.pad_token_id': None})
  assert validation.config_changes(old, new) == {}
  del old['grad_accum_steps']  # a config.json written before the key existed
  assert validation.config_changes(old, _saved(grad_accum_steps=2)) == {}


def test_keys_the_architecture_never_reads_may_change_and_the_domain_adaptation_rerun_resumes(tmp_path):
  """configs/tiny_bert.py inherits tiny.py's local_attention=64 (it was 128): BERT never reads it, so the
  domain-adaptation workdirs saved with 128 resume; ModernBERT reads it, so there it is a change."""
  spec = importlib.util.spec_from_file_location(
      '_domain_adaptation_config', os.path.join(ROOT, 'experiments', 'domain_adaptation', 'config.py'))
  experiment_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment_config)
  c = experiment_config.get_config()
  saved = json.loads(json.dumps(c.to_dict()))
  saved['model'].update(local_attention=128, vocab_size=4096, pad_token_id=0)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  assert c.model.type == 'bert' and c.model.local_attention == 64
  assert validation.check_resume(c, str(tmp_path)) is None
  modern = _saved(**{'model.type': 'modernbert', 'model.norm_position': None})
  with pytest.raises(ValueError, match='model.local_attention: 128 -> 64'):
    validation.check_config_change(modern, _saved(**{'model.type': 'modernbert', 'model.norm_position': None,
                                                     'model.local_attention': 64}), '/runs/a')
  rope = _saved(**{'model.positions': 'rope'})  # a BERT with RoPE reads global_rope_theta
  with pytest.raises(ValueError, match='model.global_rope_theta'):
    validation.check_config_change(rope, _saved(**{'model.positions': 'rope', 'model.global_rope_theta': 1e4}),
                                   '/runs/a')


def test_check_resume_reads_the_workdir(tmp_path):
  c = tiny_config()
  assert validation.check_resume(c, str(tmp_path)) is None  # nothing saved: a new run
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(_saved(), f)
  assert validation.check_resume(c, str(tmp_path)) is None  # the same config (vocab still unset)
  c.optimizer.learning_rate = 5e-4
  with pytest.raises(ValueError, match=r'optimizer.learning_rate: 0.001 -> 0.0005'):
    validation.check_resume(c, str(tmp_path))
  os.makedirs(tmp_path / 'imported')  # an import no checkpoint has trained: its config.json is not a run's
  assert validation.check_resume(c, str(tmp_path)) is None
  os.makedirs(tmp_path / 'checkpoints' / '4')
  with pytest.raises(ValueError, match='optimizer.learning_rate'):
    validation.check_resume(c, str(tmp_path))


def test_imported_architecture_is_adopted_and_compute_keys_stay_the_configs(tmp_path):
  imported = _saved(**{'model.hidden_size': 36, 'model.num_heads': 3, 'model.num_layers': 3,
                       'model.hidden_dropout': 0.1, 'model.dtype': 'auto'})
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(imported, f)
  c = tiny_config()
  c.model.hidden_dropout, c.model.remat = 0.0, True
  assert validation.adopt_imported(c, str(tmp_path)) is c  # not an import: unchanged
  os.makedirs(tmp_path / 'imported')
  adopted = validation.adopt_imported(c, str(tmp_path), set_keys=['model.hidden_dropout', 'batch_size'])
  m = adopted.model
  assert (m.hidden_size, m.num_heads, m.num_layers, m.vocab_size, m.pad_token_id) == (36, 3, 3, 1000, 0)
  assert (m.hidden_dropout, m.dtype, m.remat) == (0.0, 'float32', True)  # the config's, not the import's
  c.model.num_heads = 3
  validation.adopt_imported(c, str(tmp_path), set_keys=['model.num_heads'])  # the imported value: fine
  c.model.hidden_size = 48
  with pytest.raises(ValueError, match=r'model.hidden_size: 36 -> 48.*drop them') as e:
    validation.adopt_imported(c, str(tmp_path), set_keys=['model.hidden_size', 'model.dtype'])
  assert 'dtype' not in str(e.value).split('(')[1].split(';')[0]  # only the architecture key is named


def test_choices_copies_equal_the_modules_definitions():
  from mlm_flax import data  # pylint: disable=g-import-not-at-top
  from mlm_flax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from mlm_flax.objectives import masking  # pylint: disable=g-import-not-at-top
  assert validation.CHOICES['masking.strategy'] == masking.STRATEGIES
  assert validation.CHOICES['data.packing'] == data.PACKING_MODES
  assert validation.CHOICES['data.tokenizer_type'] == tokenizer.TOKENIZER_TYPES


# --- command line -------------------------------------------------------------------------------------------

def _tree_files(path):
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _corpus(tmp_path):
  """--config overrides for a small local text corpus (seconds to tokenize) cached under tmp_path."""
  words = ('return the number of items in list open file and read its contents if value is none raise an '
           'error simple class for command interpreters').split()
  rng = np.random.default_rng(0)
  with open(tmp_path / 'corpus.txt', 'w') as f:
    f.writelines(' '.join(rng.choice(words, rng.integers(8, 40))) + '.\n' for _ in range(400))
  return ['--config.data.dataset=', f'--config.data.train_files={tmp_path / "corpus.txt"}',
          f'--config.data.cache_dir={tmp_path / "cache"}']


def _metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ('wall_seconds', 'tokens_per_second', 'mfu')} for r in rows]


def test_imported_workdir_resumes_with_the_same_config(tmp_path):
  """Import (params at step 0, training dtype auto), train from the imported weights to a checkpoint, the same config again: resumed (today's main refused it), not retrained;
  a changed batch_size is refused naming it, the workdir untouched. The kill-and-resume CLI version of this
  (three CLI runs) is the `slow` test below."""
  from test_hf import _save_random  # pylint: disable=g-import-not-at-top  (needs torch)
  import jax  # pylint: disable=g-import-not-at-top
  from mlm_flax import inference, train  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
  hf_path, _, _ = _save_random(tmp_path, 'bert')  # hidden 36, 3 layers, dropout 0.1, 40 positions
  work = str(tmp_path / 'work')
  hf.import_to_workdir(hf_path, work)
  _corpus(tmp_path)
  c = tiny_config(tmp_path)
  c.data.dataset, c.data.train_files = '', str(tmp_path / 'corpus.txt')
  c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps, c.max_eval_batches = 4, 2, 4, 2
  c.model.hidden_dropout = 0.0
  imported = inference.load(work)
  assert imported.step == 0 and imported.config.model.hidden_size == 36
  with open(os.path.join(work, 'config.json')) as f:
    assert json.load(f)['model']['dtype'] == 'auto'  # training's default, not inference's f32
  first = train.train_and_evaluate(c, work)
  with open(os.path.join(work, 'config.json')) as f:
    model = json.load(f)['model']
  assert (model['hidden_size'], model['num_layers'], model['hidden_dropout']) == (36, 3, 0.0)
  trained = inference.load(work)
  deltas = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(trained.params))]
  assert trained.step == 4 and 0 < max(deltas) < 0.01  # moved a little from the imported weights, not a fresh init
  with pytest.raises(FileExistsError):
    hf.import_to_workdir(hf_path, work)
  before = _tree_files(work)
  again = train.train_and_evaluate(c, work)  # the same config: resumes at step 4, nothing left to train
  assert again == first
  c.batch_size = 16
  with pytest.raises(ValueError, match='batch_size: 8 -> 16'):
    train.train_and_evaluate(c, work)
  after = _tree_files(work)
  assert {k: v for k, v in after.items() if not k.startswith('tensorboard')} == {
      k: v for k, v in before.items() if not k.startswith('tensorboard')}


@pytest.mark.slow
def test_imported_workdir_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path):
  """Import, train, SIGTERM after the first checkpoint, the same command again: resumed, equal to an
  uninterrupted run. Then a changed batch_size or architecture is one `error:` line, nothing touched."""
  from test_hf import _save_random  # pylint: disable=g-import-not-at-top  (needs torch)
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  hf_path, _, _ = _save_random(tmp_path, 'bert')  # hidden 36, 3 layers, dropout 0.1, 40 positions
  steps = 20
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  for work in (full, killed):
    hf.import_to_workdir(hf_path, work)
  args = [*_corpus(tmp_path), f'--config.num_train_steps={steps}', '--config.batch_size=8', '--config.eval_batch_size=16',
          '--config.max_seq_length=32', '--config.log_every_steps=5', '--config.eval_every_steps=10',
          '--config.checkpoint_every_steps=5', '--config.max_eval_batches=2', '--config.fill_mask_examples=0',
          '--config.progress_bar=False', '--config.model.hidden_dropout=0.0', '--config.model.attention_dropout=0.1',
          '--config.model.dtype=float32', '--config.optimizer.learning_rate=1e-4']
  ref = _cli('train', f'--workdir={full}', *args)
  assert ref.returncode == 0, ref.stderr[-3000:]
  final = json.loads(ref.stdout.strip().splitlines()[-1])

  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  with open(killed + '.log', 'w') as log:  # SIGTERM once the first checkpoint is complete
    proc = subprocess.Popen(CLI + ['train', f'--workdir={killed}'] + args, env=env, stdout=log,
                            stderr=subprocess.DEVNULL)
    ckpts = os.path.join(killed, 'checkpoints')
    while proc.poll() is None and not (os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))):
      time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0
  with open(killed + '.log') as f:
    assert 'Preempted at step' in f.read()
  resumed = _cli('train', f'--workdir={killed}', *args)  # the same command
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  assert json.loads(resumed.stdout.strip().splitlines()[-1]) == final
  assert _metric_rows(killed) == _metric_rows(full)
  a, b = inference.load(full), inference.load(killed)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  with open(os.path.join(killed, 'config.json')) as f:
    model = json.load(f)['model']
  assert (model['hidden_size'], model['num_layers']) == (36, 3)  # the import's architecture
  assert (model['hidden_dropout'], model['attention_dropout'], model['dtype']) == (0.0, 0.1, 'float32')

  before = _tree_files(killed)
  for change, message in [('--config.batch_size=16', 'batch_size: 8 -> 16'),
                          ('--config.model.hidden_size=48', 'model.hidden_size: 36 -> 48')]:
    out = _cli('train', f'--workdir={killed}', *args, change)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    assert lines[-1].startswith('error: ') and message in lines[-1], lines
  assert _tree_files(killed) == before  # checkpoints, config.json and metrics untouched
