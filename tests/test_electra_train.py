"""ELECTRA on the one train step and loop: 1 vs 8 devices and gradient accumulation give the same training, the
evaluation does not depend on batch size or device count, a killed run resumes exactly, and a run exports,
imports, evaluates and fine-tunes."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import evaluate, inference, parallel, train, writers
from mlm_flax.objectives import electra, masking
from test_train import random_batch

_PARITY = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from mlm_flax import evaluate, parallel, train
from test_electra_train import setup, eval_rows
from test_train import random_batch
assert len(jax.devices()) == 8, jax.devices()
out = {}
for name, n, accum in (('one', 1, 1), ('eight', 8, 1), ('accum', 1, 2)):
  mesh = parallel.make_mesh(n)
  objective, tx, state = setup(mesh)
  step = train.jit_step(objective, tx, mesh, grad_accum_steps=accum)
  rows = []
  for i in range(3):
    state, m = step(state, parallel.to_global(random_batch(i), mesh))
    rows.append([float(m['loss_sum'] / m['count']), float(m['disc_loss_sum'] / m['disc_count']), float(m['replaced'])])
  leaves = jax.tree.leaves(state.params)
  out[name] = {'rows': rows, 'param_sum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}
  if accum == 1:  # evaluation: 16-row batches on one device, 8-row batches split over eight
    evaluator = evaluate.Evaluator(objective.__class__(**{**objective.__dict__, 'num_predictions': 5}), mesh, 0)
    if n == 1:
      one_params = state.params  # both score these params
    out[name]['eval'] = evaluator(jax.device_put(one_params, parallel.replicated(mesh)), eval_rows(), 16 if n == 1 else 8)
print(json.dumps(out))
'''


def setup(mesh, dropout=0.1):
  """A tiny BERT discriminator with a generator half as wide, on `test_train.random_batch`'s 200-token vocabulary."""
  c = tiny_config()
  c.model.type, c.model.vocab_size, c.model.pad_token_id = 'bert', 200, 0
  c.model.hidden_dropout = c.model.attention_dropout = dropout
  objective_cfg = {'generator_hidden_fraction': 0.5, 'generator_layers_fraction': 0.5, 'disc_weight': 50.0}
  generator, discriminator = electra.make_models(c.model, objective_cfg)
  mask_fn = functools.partial(masking.mask_tokens, vocab_size=200, mask_id=4, special_ids=(0, 1, 2, 3, 4), pad_id=0)
  objective = electra.Electra(generator, discriminator, mask_fn, masking.max_predictions(32, 0.15),
                              c.model.to_dict(), objective_cfg)
  tx = train.make_optimizer(c.optimizer, 10)
  state = jax.jit(functools.partial(train.create_train_state, model=objective, tx=tx, seq_len=32),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  return objective, tx, state


def eval_rows(n: int = 40) -> dict[str, np.ndarray]:
  batches = [random_batch(100 + i) for i in range(-(-n // 16))]
  return {k: np.concatenate([b[k] for b in batches])[:n] for k in batches[0]}


def test_one_eight_devices_and_accumulation_train_and_evaluate_alike():
  here = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, '-c', _PARITY, here], capture_output=True, text=True, env=env, cwd=here,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one = out['one']
  assert one['rows'][0] != one['rows'][2] and one['rows'][0][2] > 0  # it trained, and tokens were replaced
  for other in ('eight', 'accum'):
    np.testing.assert_allclose(out[other]['rows'], one['rows'], rtol=1e-5)
    np.testing.assert_allclose(out[other]['param_sum'], one['param_sum'], rtol=1e-5)
  # The same params scored on 8 devices with another batch size: the same masks, samples and counts.
  a, b = one['eval'], out['eight']['eval']
  for key in ('num_masked_tokens', 'num_disc_tokens', 'num_replaced_tokens', 'masked_accuracy', 'disc_auc'):
    assert a[key] == b[key], key
  np.testing.assert_allclose(a['disc_loss'], b['disc_loss'], rtol=1e-5)
  assert 0.0 <= a['disc_auc'] <= 1.0


def _config(tmp_path):
  c = tiny_config(tmp_path)
  c.model.type, c.objective.type = 'bert', 'electra'
  c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps = 8, 4, 4
  return c


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in ('wall_seconds', 'tokens_per_second', 'mfu')} for r in rows]


def test_electra_run_resumes_exactly_exports_imports_and_fine_tunes(tmp_path):
  """A run killed after its step-4 checkpoint resumes to the uninterrupted run's params and metrics; its eval
  reports both models; export → import keeps every weight (the same eval); fill-mask uses the generator, and
  fine-tuning starts from the discriminator's encoder."""
  config = _config(tmp_path)
  full = str(tmp_path / 'full')
  result = train.train_and_evaluate(config, full)
  assert {'masked_accuracy', 'disc_accuracy', 'disc_auc', 'replaced_recall'} <= set(result)
  killed = str(tmp_path / 'killed')
  shutil.copytree(full, killed)
  shutil.rmtree(os.path.join(killed, 'checkpoints', '8'))
  assert train.train_and_evaluate(config, killed) == result
  assert _strip(writers.read_metrics(killed)) == _strip(writers.read_metrics(full))
  jax.tree.map(np.testing.assert_array_equal, inference.load_run(killed)[1], inference.load_run(full)[1])

  from mlm_flax import cli  # pylint: disable=g-import-not-at-top
  out, imported = str(tmp_path / 'hf'), str(tmp_path / 'imported')
  cli._export(full, out)  # pylint: disable=protected-access
  with open(os.path.join(out, 'generator', 'config.json')) as f:
    assert json.load(f)['architectures'] == ['ElectraForMaskedLM']
  from mlm_flax.interop import electra as electra_interop  # pylint: disable=g-import-not-at-top
  assert electra_interop.is_pair(out)
  electra_interop.import_to_workdir(out, imported)
  with open(os.path.join(full, 'config.json')) as f:  # the imported run: the same data, lengths and seed
    run_config = json.load(f)
  with open(os.path.join(imported, 'config.json')) as f:
    imported_config = json.load(f)
  assert imported_config['objective']['type'] == 'electra' and imported_config['model']['type'] == 'electra'
  with open(os.path.join(imported, 'config.json'), 'w') as f:
    json.dump({**run_config, 'model': imported_config['model'], 'objective': imported_config['objective']}, f)
  ours, theirs = evaluate.evaluate_workdir(full), evaluate.evaluate_workdir(imported)
  assert {k: v for k, v in theirs.items() if k != 'step'} == {k: v for k, v in ours.items() if k != 'step'}

  mlm = inference.load(full)  # fill-mask: the generator, half... a quarter of the width by default
  assert mlm.config.model.hidden_size == config.model.hidden_size // 4
  assert len(inference.fill_mask(mlm, f'a b {mlm.tokenizer.mask_token} c', top_k=3)) == 3
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  encoder = task_model.load_encoder(full)
  disc = inference.load_run(full)[1]['discriminator']['encoder']
  jax.tree.map(np.testing.assert_array_equal, encoder.params['word_embeddings'], disc['word_embeddings'])


def test_modernbert_electra_resumes_exactly_fine_tunes_and_refuses_hf_export(tmp_path):
  """ELECTRA on the quick start's architecture: a ModernBERT discriminator and a quarter-width ModernBERT generator
  (its `embeddings_project` from the shared embeddings); resume is exact, fill-mask and fine-tuning use the right
  model, and export names why transformers has no equivalent."""
  config = tiny_config(tmp_path)
  config.model.type, config.objective.type = 'modernbert', 'electra'
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 6, 3, 3
  full = str(tmp_path / 'full')
  result = train.train_and_evaluate(config, full)
  assert {'masked_accuracy', 'disc_accuracy', 'disc_auc'} <= set(result)
  params = inference.load_run(full)[1]
  assert 'embeddings_project' in params['generator'] and 'word_embeddings' not in params['generator']
  killed = str(tmp_path / 'killed')
  shutil.copytree(full, killed)
  shutil.rmtree(os.path.join(killed, 'checkpoints', '6'))
  assert train.train_and_evaluate(config, killed) == result
  jax.tree.map(np.testing.assert_array_equal, inference.load_run(killed)[1], params)

  mlm = inference.load(full)  # the generator
  assert (mlm.config.model.type, mlm.config.model.hidden_size) == ('modernbert', config.model.hidden_size // 4)
  assert len(inference.fill_mask(mlm, f'a b {mlm.tokenizer.mask_token} c', top_k=3)) == 3
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  encoder = task_model.load_encoder(full)
  jax.tree.map(np.testing.assert_array_equal, encoder.params, params['discriminator']['encoder'])
  from mlm_flax import cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="BERT-style encoder.*'modernbert'"):
    cli._export(full, str(tmp_path / 'hf'))  # pylint: disable=protected-access
  assert not os.path.exists(tmp_path / 'hf')
