"""notebooks/quickstart.ipynb runs end to end on CPU (a short run injected after its `parameters` cell)."""

import json
import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')
SHORT_RUN = """NUM_TRAIN_STEPS = 30
BATCH_SIZE = 8
MAX_SEQ_LENGTH = 64
EVAL_EVERY_STEPS = 15"""


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(SHORT_RUN))  # as papermill injects parameters
  # The kernel imports this checkout (not another installed copy) and writes its workdirs under tmp_path.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any('image/png' in o.get('data', {}) for o in outputs)  # the learning curves, inline
  assert os.path.isfile(tmp_path / 'workdirs' / 'quickstart' / 'curves.png')
  assert os.path.isfile(tmp_path / 'workdirs' / 'quickstart-hf' / 'model.safetensors')
  last = ''.join(o.text for o in nb.cells[-1].outputs if o.output_type == 'stream' and o.name == 'stdout')
  summary = json.loads(last.strip().splitlines()[-1])
  assert len(summary['fill_mask']) == 5
  if 'pipeline' in summary:  # torch installed: transformers' pipeline agrees with our fill-mask
    assert summary['same_tokens'], summary
    assert summary['max_score_difference'] < 1e-4
