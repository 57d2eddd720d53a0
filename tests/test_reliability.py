"""Reliability: corrupt checkpoints fall back, failed saves keep the good ones, one trainer per workdir,
non-finite steps are skipped or stop the run, bad configs fail before any work."""

import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import (checkpoint, evaluate, hostmem, inference, loop, parallel, preemption, train, validation,
                      workdir_lock, writers)
from mlm_flax.interop import hf
from test_train import random_batch, setup

CLI = [sys.executable, '-m', 'mlm_flax.cli']


def _cli(*args, timeout=300):
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir trained for 8 steps with checkpoints at 4 and 8 (shared, copy before changing it)."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  c = tiny_config()
  c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps, c.max_eval_batches = 8, 4, 8, 2
  train.train_and_evaluate(c, workdir)
  return workdir, c


def _copy(trained, tmp_path):
  dst = str(tmp_path / 'run')
  shutil.copytree(trained[0], dst)
  return dst


def _params_file(workdir, step):
  """The largest data file of the params item: the embedding table."""
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'params', '**'), recursive=True)
           if os.path.isfile(f) and '/d/' in f]
  return max(files, key=os.path.getsize)


def _corrupt(workdir, step, how):
  path = _params_file(workdir, step)
  size = os.path.getsize(path)
  if how == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
  elif how == 'garbage':
    with open(path, 'wb') as f:
      f.write(os.urandom(size))
  elif how == 'one_byte_flipped':  # decodes fine; only the fingerprint notices
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0x40]))
  elif how == 'missing_file':
    os.remove(path)
  elif how == 'not_finalised':
    os.remove(os.path.join(workdir, 'checkpoints', str(step), checkpoint.COMMIT_MARKER))


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'one_byte_flipped', 'missing_file', 'not_finalised'])
def test_corrupt_latest_checkpoint_falls_back_for_inference(trained, tmp_path, caplog, how):
  workdir = _copy(trained, tmp_path)
  good = inference.load(workdir)
  assert good.step == 8
  _corrupt(workdir, 8, how)
  mlm = inference.load(workdir)  # fill-mask, eval and export all load through here
  assert mlm.step == 4
  assert 'checkpoints/8 is corrupt' in caplog.text and 'left it in place' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8'))  # read-only commands rename nothing
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(mlm.params))]
  assert any(changed)  # it really is the older checkpoint


def test_corrupt_checkpoint_eval_export_and_train_fall_back(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  _corrupt(workdir, 8, 'truncated')
  assert evaluate.evaluate_workdir(workdir)['step'] == 4
  out = str(tmp_path / 'hf')
  hf.export(inference.load(workdir), out)
  assert os.path.isfile(os.path.join(out, 'model.safetensors'))
  # train resumes from step 4, renames the bad folder aside and saves a new step 8 where it was.
  c = trained[1].copy_and_resolve_references()
  train.train_and_evaluate(c, workdir)
  assert 'renamed it to' in caplog.text
  aside = glob.glob(os.path.join(workdir, 'checkpoints', 'corrupt-8-*'))
  assert len(aside) == 1 and os.path.isfile(os.path.join(aside[0], checkpoint.COMMIT_MARKER))
  assert inference.load(workdir).step == 8
  steps = [r['step'] for r in writers.read_metrics(workdir) if r['split'] == 'train']
  assert steps == sorted(set(steps))  # rows after step 4 were replaced, not duplicated
  ref = inference.load(trained[0])  # the retrained step 8 equals the original step 8
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(inference.load(workdir).params)):
    np.testing.assert_array_equal(a, b)


def _make_read_only(path):
  if os.geteuid() == 0:  # root ignores permissions; an immutable folder refuses even root
    if subprocess.run(['chattr', '+i', path], capture_output=True).returncode:
      pytest.skip('cannot make a read-only folder here (running as root without chattr)')
    return lambda: subprocess.run(['chattr', '-i', path], check=True)
  os.chmod(path, 0o555)
  return lambda: os.chmod(path, 0o755)


def test_failed_save_is_a_clear_error_and_keeps_the_good_checkpoints(tmp_path):
  mesh = parallel.make_mesh(1)
  state = setup(mesh)[-1]
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2):
    ckpt.save(step, state, {'step': step})
  ckpt.wait()
  undo = _make_read_only(ckpt.directory)
  try:
    with pytest.raises(OSError, match='could not save the checkpoint of step 3') as e:
      ckpt.save(3, state, {'step': 3})
      ckpt.wait()
    assert ckpt.directory in str(e.value) and 'writable' in str(e.value) and 'step 2' in str(e.value)
  finally:
    undo()
    with contextlib.suppress(Exception):  # the failed save's threads, else they time out at exit
      ckpt.close()
  assert sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit()) == [1, 2]
  reader = checkpoint.Checkpointer(str(tmp_path), create=False)
  restored, meta = reader.restore(state)
  reader.close()
  assert meta['step'] == 2
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, b)


def test_checkpoints_path_that_is_a_file_is_a_clear_error(tmp_path):
  with open(tmp_path / 'checkpoints', 'w') as f:
    f.write('not a folder')
  with pytest.raises(OSError, match='is a file, not a folder'):
    checkpoint.Checkpointer(str(tmp_path))


_HOLDER = '''
import sys, time
sys.path.insert(0, sys.argv[2])
from mlm_flax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


def test_second_trainer_on_a_workdir_is_refused_and_a_dead_holder_frees_it(tmp_path):
  workdir = str(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, workdir, root], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    out = _cli('train', f'--workdir={workdir}', '--config.num_train_steps=2')
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert f'in use by another `mlm-flax train` (PID {holder.pid}' in out.stderr
  finally:
    holder.kill()  # SIGKILL: the kernel drops the flock; the stale .lock file must not block
    holder.wait()
  assert open(os.path.join(workdir, '.lock')).read().strip() == str(holder.pid)
  with workdir_lock.hold(workdir):
    assert open(os.path.join(workdir, '.lock')).read().strip() == str(os.getpid())


def test_nonfinite_steps_are_skipped_in_graph():
  mesh = parallel.make_mesh(1)
  model, _, mask_fn, num_predictions, state = setup(mesh, dropout=0.0)
  c = tiny_config()
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.grad_clip_norm = 1e30, 0, 0.0
  tx = train.make_optimizer(c.optimizer, 10)  # a real cause: params blow up, the next loss is NaN
  state = state.replace(opt_state=tx.init(state.params))
  step = train.jit_train_step(model, tx, mask_fn, num_predictions, mesh)
  skipped, before = [], None
  for i in range(4):
    before = jax.device_get(state.params)
    state, m = step(state, parallel.to_global(random_batch(i), mesh))
    skipped.append(float(m['skipped_steps']))
  assert skipped[0] == 0.0 and skipped[-1] == 1.0, skipped
  after = jax.device_get(state.params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):  # the skipped step changed nothing
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 4 and float(m['loss_sum']) == 0.0 and float(m['count']) == 0.0


def test_a_state_with_a_nonfinite_value_is_never_checkpointed(tmp_path):
  """The step guard tests the loss and gradient; a param that overflows all the same is refused at the save."""
  *_, state = setup(parallel.make_mesh(1), dropout=0.0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), async_save=False)
  ckpt.save(1, state, {'step': 1})
  ckpt.wait()
  leaves, treedef = jax.tree.flatten(state.opt_state)
  first = next(i for i, x in enumerate(leaves) if x.ndim > 1)
  leaves[first] = leaves[first].at[0, 0].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=r'state of step 2 has non-finite values \(opt_state.*; not saved'):
    ckpt.save(2, state.replace(opt_state=jax.tree.unflatten(treedef, leaves)), {'step': 2})
  ckpt.wait()
  assert ckpt.manager.all_steps() == [1]
  ckpt.close()


def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
  c = tiny_config()
  c.num_train_steps, c.checkpoint_every_steps, c.log_every_steps, c.eval_every_steps = 6, 1, 1, 100
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.grad_clip_norm = 1e30, 0, 0.0
  c.optimizer.nonfinite = 'stop'
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match=r'non-finite loss or gradient at step (\d+)') as e:
    train.train_and_evaluate(c, workdir)
  bad = int(str(e.value).split('at step ')[1].split(';')[0])
  mlm = inference.load(workdir)  # the last checkpoint is complete, finite, and before the bad step
  assert 1 <= mlm.step < bad
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(mlm.params))
  assert all(r['skipped_steps'] == 0 for r in writers.read_metrics(workdir) if r['split'] == 'train')


def test_on_cpu_the_loop_waits_for_each_step_before_the_next(tmp_path):
  """`parallel.steps_queued()` is 0 on CPU: the loop waits for a step before it draws the next batch (a queued
  XLA:CPU step sets up its buffers beside the running one's: BERT-base 2.2x slower)."""
  assert parallel.steps_queued() == 0
  c = tiny_config()
  c.num_train_steps, c.eval_every_steps, c.max_eval_batches, c.eval_batch_size = 6, 3, 4, 4
  dispatched, ready_at_next_batch = [], []
  with contextlib.ExitStack() as on_exit, preemption.watch() as preempt:
    run = train._set_up(c, str(tmp_path / 'run'), on_exit)  # pylint: disable=protected-access

    def step(state, batch):
      state, metrics = run.step(state, batch)
      dispatched.append(metrics['skipped_steps'])
      return state, metrics

    def batches():
      for batch in run.batches:
        ready_at_next_batch.append(all(m.is_ready() for m in dispatched))
        yield batch

    outcome = loop.run_loop(dataclasses.replace(run, step=step, batches=batches()), preempt)
  assert outcome.step == 6 and len(ready_at_next_batch) == 6 and all(ready_at_next_batch)


def _glibc_tuned() -> bool:
  """Whether `mlm_flax.hostmem` tuned glibc's malloc here (and the malloc in use is glibc's)."""
  return (not hostmem.opted_out() and 'alloc' not in os.environ.get('LD_PRELOAD', '')
          and sys.platform.startswith('linux'))


def test_freed_host_memory_stays_with_the_process():
  """`import mlm_flax` turns glibc's trimming off (`hostmem`): a freed 3 GB block stays in the process for the
  next step's buffers. With a 2 GB trim threshold glibc handed it back, and a BERT-base step page-faulted it in
  again every step."""
  if not _glibc_tuned():
    pytest.skip('glibc left as it is here')
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype, libc.sbrk.restype = ctypes.c_void_p, ctypes.c_void_p
  libc.malloc.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_ssize_t]
  libc.free.argtypes = [ctypes.c_void_p]
  block = libc.malloc(3 << 30)  # untouched: address space, not memory
  assert block
  top = libc.sbrk(0)
  libc.free(block)
  assert libc.sbrk(0) >= top  # not trimmed (other threads may only have grown the heap)


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                    'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


def test_on_cpu_a_computations_temporaries_are_freed_when_it_returns():
  """`mlm_flax.parallel` has XLA:CPU run single-device computations in the calling thread: when a step returns,
  its temporaries are back in the heap. Dispatched asynchronously, a runtime thread freed them some time later,
  and a next step allocated first grew the heap by a step's temporaries (BERT-base: 7.7 -> 18.5 GB in some runs)."""
  if not _glibc_tuned() or jax.default_backend() != 'cpu':
    pytest.skip('glibc or the CPU client left as they are here')
  libc = ctypes.CDLL('libc.so.6')
  libc.mallinfo2.restype = _MallInfo2
  in_use = lambda: libc.mallinfo2().uordblks
  x, w, v = jnp.ones((8192, 256)), jnp.ones((256, 8192)), jnp.ones((8192, 1))
  step = jax.jit(lambda x, w, v: ((x @ w) @ v).sum())  # x @ w: a 256 MB temporary, ~0.1 s of work
  step(x, w, v).block_until_ready()
  before = in_use()
  for _ in range(3):
    out = step(x, w, v)
    assert out.is_ready()  # it ran in this thread: dispatched asynchronously, the call returns at once
    assert in_use() - before < (64 << 20)  # and its temporary is back in the heap


def test_metrics_rows_after_the_resumed_step_and_half_written_rows_are_dropped(tmp_path):
  rows = [{'step': s, 'split': 'train', 'loss': 1.0} for s in (5, 10, 15)] + [{'step': 10, 'split': 'eval'}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write('{"step": 20, "split": "tr')  # killed mid-write
  writers.MetricWriter(str(tmp_path), resume_step=10).close()
  assert writers.read_metrics(str(tmp_path)) == [rows[0], rows[1], rows[3]]


# --- validation: each bad config fails in seconds, names the key, exit code 2, no traceback ---------------

def test_bad_config_fails_fast_on_the_command_line(tmp_path):
  """One CLI smoke test (each costs a JAX import); the checks themselves: test_validate_config."""
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  out = _cli('train', f'--workdir={workdir}', f'--config.data.cache_dir={cache}', '--config.optimizer.schedule=cosin')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith('error: ') and "Did you mean 'cosine'" in out.stderr
  assert not os.path.exists(cache) and not os.path.exists(workdir)  # before any data, tokenizer or workdir work


def test_config_file_with_an_unknown_key_is_one_clear_line(tmp_path):
  path = tmp_path / 'my_config.py'
  path.write_text('from mlm_flax.configs import default\n\ndef get_config():\n  c = default.get_config()\n'
                  '  c.model.hiden_size = 3\n  return c\n')
  out = _cli('train', f'--config={path}', f'--workdir={tmp_path}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert "sets config key 'hiden_size'" in out.stderr and 'Did you mean "hidden_size"' in out.stderr


def test_resuming_with_a_different_model_fails_before_any_work(tmp_path):
  c = tiny_config()
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(c.to_dict(), f)
  c.model.hidden_size = 48
  with pytest.raises(ValueError, match=r'model.hidden_size: 32 -> 48.*--config.model.hidden_size=32'):
    train.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_tokenizer_larger_than_the_model_vocab_fails_before_compiling(trained, tmp_path):
  c = trained[1].copy_and_resolve_references()
  c.model.vocab_size = 100
  with pytest.raises(ValueError, match='model.vocab_size=100 is smaller than the tokenizer'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))


@pytest.mark.parametrize('key, value, message', [
    ('batch_size', 12, 'use a multiple of 8'),
    ('eval_batch_size', 4, 'use a multiple of 8'),
    ('model.type', 'robertta', "Did you mean 'roberta'"),
    ('masking.mask_prob', 0.95, 'exceeds 1'),
    ('model.dtype', 'float16', 'no loss scaling'),  # precision traps: why, and the fix
    ('model.param_dtype', 'bfloat16', 'master weights in 16 bits'),
    ('model.param_dtype', 'float16', 'param_dtype=float32'),
    ('masking.strategy', 'spam', "Did you mean 'span'"),  # typos fail before the corpus and tokenizer
    ('data.packing', 'document', "Did you mean 'documents'"),
    ('data.tokenizer_type', 'wordpeice', "Did you mean 'wordpiece'"),
    ('model.dtype', 'float17', "Did you mean 'float16'"),
    ('optimizer.schedule', 'cosin', "Did you mean 'cosine'"),
    ('optimizer.nonfinite', 'ignore', 'optimizer.nonfinite'),
    ('masking.rate', 1.5, 'masking.rate=1.5 must be a fraction'),
    ('model.num_heads', 5, 'not divisible by model.num_heads=5'),
    ('max_seq_length', 1024, 'raise model.max_position_embeddings'),
    ('checkpoint_every_steps', 0, 'checkpoint_every_steps=0 must be at least 1'),
])
def test_validate_config(key, value, message):
  c = tiny_config()
  node, _, leaf = key.rpartition('.')
  (c[node] if node else c)[leaf] = value
  with pytest.raises(ValueError, match=message):
    validation.validate_config(c, num_devices=8)
  validation.validate_config(tiny_config(), num_devices=8)  # the tiny config itself is fine
