"""`mlm-flax plot`: metrics.jsonl of one or several workdirs -> a PNG; a clear error without metrics."""

import json
import os
import subprocess
import sys

import pytest

from mlm_flax import plot

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _workdir(path, accuracy_scale=1.0):
  os.makedirs(path)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for step in range(10, 101, 10):
      f.write(json.dumps({'step': step, 'split': 'train', 'loss': 8 - step / 20,
                          'masked_accuracy': accuracy_scale * step / 400, 'learning_rate': 1e-3}) + '\n')
      if step % 50 == 0:
        f.write(json.dumps({'step': step, 'split': 'eval', 'loss': 8.2 - step / 20,
                            'masked_accuracy': accuracy_scale * step / 450, 'perplexity': 9.0}) + '\n')
  return str(path)


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_SIGNATURE and os.path.getsize(path) > 10_000


def test_plot_runs_writes_a_png(tmp_path):
  a = _workdir(tmp_path / 'a')
  assert plot.plot_runs([a]) == os.path.join(a, 'curves.png')  # default: WORKDIR/curves.png
  assert _is_png(os.path.join(a, 'curves.png'))


def test_cli_compares_workdirs_on_one_figure(tmp_path):
  a, b = _workdir(tmp_path / 'a'), _workdir(tmp_path / 'b', accuracy_scale=0.5)
  out = str(tmp_path / 'compare.png')
  proc = subprocess.run([sys.executable, '-m', 'mlm_flax.cli', 'plot', f'--workdir={a},{b}', f'--out={out}'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {'plot': out}
  assert _is_png(out)


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl not found'):
    plot.plot_runs([str(tmp_path)])
  proc = subprocess.run([sys.executable, '-m', 'mlm_flax.cli', 'plot', f'--workdir={tmp_path}'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'error:' in proc.stderr and 'metrics.jsonl not found' in proc.stderr
  assert 'Traceback' not in proc.stderr
