"""Multi-host: 2 processes (1 CPU device each) train exactly like 1 process with 2 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from test_cli import CLI

STEPS = 6
OVERRIDES = [
    f'--config.num_train_steps={STEPS}', '--config.batch_size=8', '--config.eval_batch_size=16',
    '--config.max_seq_length=32', '--config.log_every_steps=2', '--config.eval_every_steps=6',
    '--config.checkpoint_every_steps=6', '--config.fill_mask_examples=0', '--config.progress_bar=False',
    '--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=4',
    '--config.model.intermediate_size=64', '--config.model.max_position_embeddings=64',
    '--config.data.tokenizer_vocab_size=300', '--config.optimizer.warmup_steps=2',
    '--config.data.dataset=', '--config.masking.strategy=whole_word']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(tmp_path, name, devices):
  return {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'MLM_FLAX_CACHE': str(tmp_path / f'cache-{name}')}  # separate disks, as on separate hosts


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  return [(r['step'], r['loss'], r['num_masked_tokens']) for r in rows if r['split'] == 'train'], \
         [r['loss'] for r in rows if r['split'] == 'eval']


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  rng = np.random.default_rng(0)
  words = [f'w{i}' for i in range(200)]
  with open(tmp_path / 'train.jsonl', 'w') as f:
    for _ in range(300):
      f.write(json.dumps({'text': ' '.join(rng.choice(words, rng.integers(3, 40)))}) + '\n')
  args = ['train', *OVERRIDES, f'--config.data.train_files={tmp_path / "train.jsonl"}']

  port = _free_port()
  runs = {  # all three at once: the 2-process run and the 1-process reference
      'one': (args + [f'--workdir={tmp_path / "one"}'], _env(tmp_path, 'one', 2)),
      **{f'p{i}': (args + [f'--workdir={tmp_path / "two"}', f'--coordinator_address=127.0.0.1:{port}',
                           '--num_processes=2', f'--process_id={i}'], _env(tmp_path, f'p{i}', 1))
         for i in range(2)}}
  procs = {k: subprocess.Popen(CLI + a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
           for k, (a, e) in runs.items()}
  outs = {k: p.communicate(timeout=400) for k, p in procs.items()}
  for k, p in procs.items():
    assert p.returncode == 0, (k, outs[k][1][-3000:])

  train_one, eval_one = _train_losses(tmp_path / 'one')
  train_two, eval_two = _train_losses(tmp_path / 'two')
  assert [s for s, _, _ in train_two] == [2, 4, 6]  # one row per log step: process 0 writes alone
  assert [n for *_, n in train_two] == [n for *_, n in train_one]  # same masks, same batches
  np.testing.assert_allclose([l for _, l, _ in train_two], [l for _, l, _ in train_one], rtol=1e-5)
  np.testing.assert_allclose(eval_two, eval_one, rtol=1e-5)
  assert json.loads(outs['p0'][0].strip().splitlines()[-1])['step'] == STEPS
  assert os.path.isdir(tmp_path / 'two' / 'tokenizer') and os.path.isdir(tmp_path / 'two' / 'checkpoints' / '6')
  # Each process tokenized only its half; process 1 trained no tokenizer and wrote none.
  assert not os.path.isdir(tmp_path / 'cache-p1' / 'tokenizers')
  assert os.path.isdir(tmp_path / 'cache-p0' / 'tokenizers')
