"""Schedules over training: the masking rate (`masking.rate_schedule`), sequence-length and batch-size warm-ups
(`seq_len_warmup`, `batch_size_warmup`): what each step sees, exact resume across phases, config errors."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import data, train, validation
from mlm_flax.data import tokenizer as tok_lib
from mlm_flax.objectives import masking
from mlm_flax.objectives import mlm

WORDS = ('return the number of items in list open file and read its contents if value is none raise an '
         'error simple class for command interpreters').split()


def _texts(n=400, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, rng.integers(8, 40))) + '.' for _ in range(n)]


@pytest.fixture(scope='module')
def tok():
  return tok_lib.train_wordpiece(_texts(), vocab_size=200)


def _ids(tok, batch=32, length=128):
  rng = np.random.default_rng(1)
  normal = [i for i in range(len(tok)) if i not in tok_lib.special_token_ids(tok)]
  return jnp.asarray(rng.choice(normal, (batch, length)).astype(np.int32))


def _scheduled(kind, rate=0.4, final=0.1, steps=100):
  c = tiny_config()
  c.num_train_steps = 1000  # schedule_steps=steps, not the run's length
  c.max_seq_length = 128
  c.masking.rate, c.masking.rate_schedule, c.masking.final_rate, c.masking.schedule_steps = rate, kind, final, steps
  return c


@pytest.mark.parametrize('kind, middle', [('linear', 0.25), ('cosine', 0.25), ('step', 0.4)])
def test_realised_mask_rate_follows_the_schedule_without_recompiling(tok, kind, middle):
  fn, budget = mlm.make_mask_fn(_scheduled(kind), tok)
  assert budget == masking.max_predictions(128, 0.4)  # the highest rate's budget: static shapes
  ids = _ids(tok)
  realised = jax.jit(lambda step: fn(jax.random.PRNGKey(0), ids, step=step).weights.mean())
  expect = {0: 0.4, 50: middle, 100: 0.1, 300: 0.1}
  if kind == 'step':
    expect[99] = 0.4
  for step, rate in expect.items():  # token masking: exactly round(rate * 128) per row of 128 maskable tokens
    assert float(realised(step)) == pytest.approx(round(rate * 128) / 128, abs=1 / 128), (kind, step)
  assert realised._cache_size() == 1  # the step is traced: one compilation for every rate


def test_constant_schedule_gives_todays_masks_bit_for_bit(tok):
  c = _scheduled('constant')
  fn, budget = mlm.make_mask_fn(c, tok)
  ids = _ids(tok)
  today = masking.mask_tokens(jax.random.PRNGKey(3), ids, vocab_size=len(tok), mask_id=tok.mask_token_id,
                              special_ids=tok_lib.special_token_ids(tok), pad_id=tok.pad_token_id, rate=0.4)
  for step in (0, 500):
    now = fn(jax.random.PRNGKey(3), ids, step=jnp.int32(step))
    for a, b in zip(now, today):
      np.testing.assert_array_equal(a, b)
  assert budget == masking.max_predictions(128, 0.4)
  c = _scheduled('linear')
  c.masking.eval_rate = 0.15
  eval_fn, eval_budget = mlm.make_mask_fn(c, tok, 'eval')  # eval keeps its rate
  assert eval_budget == masking.max_predictions(128, 0.15)
  assert float(eval_fn(jax.random.PRNGKey(0), ids).weights.mean()) == pytest.approx(19 / 128)


def test_shape_phases_and_batches_follow_the_warmups():
  c = tiny_config()
  c.seq_len_warmup, c.batch_size_warmup = '8:3,16:2', '4:2'
  phases = data.shape_phases(c)
  assert phases == [(0, 4, 8), (2, 8, 8), (3, 8, 16), (5, 8, 32)]
  planned = [data.step_shape(phases, s) for s in range(7)]
  assert planned == [(4, 8), (4, 8), (8, 8), (8, 16), (8, 16), (8, 32), (8, 32)]
  rows_at = {n: {'input_ids': np.arange(20 * n, dtype=np.int32).reshape(20, n)} for n in (8, 16, 32)}
  batches = data.pipeline.phased_train_batches(rows_at, phases, seed=0)
  seen = [next(batches) for _ in range(40)]
  assert [b['input_ids'].shape for b, _ in seen[:7]] == planned
  # Each length is one stream read across batch sizes and epochs: every row once per epoch, nothing dropped.
  rows8 = np.concatenate([b['input_ids'][:, 0] // 8 for b, _ in seen[:3]])
  assert len(set(rows8.tolist())) == 16 and seen[2][1] == {'seq_length': 8, 'batch_size': 8, 'rows': 16}
  rows32 = np.concatenate([b['input_ids'][:, 0] // 32 for b, _ in seen[5:]])
  assert sorted(rows32[:20].tolist()) == list(range(20)) and sorted(rows32[20:40].tolist()) == list(range(20))
  for start in (1, 2, 3, 5, 9):  # resuming at any step yields the same batches and positions
    resumed = data.pipeline.phased_train_batches(rows_at, phases, seed=0, start_step=start)
    for b, p in seen[start:start + 6]:
      rb, rp = next(resumed)
      np.testing.assert_array_equal(rb['input_ids'], b['input_ids'])
      assert rp == p
  assert data.shape_phases(tiny_config()) == [(0, 8, 32)]  # no warm-up: one phase, today's batches


def _corpus(tmp_path, c):
  path = tmp_path / 'corpus.txt'
  path.write_text(''.join(t + '\n' for t in _texts()))
  c.data.dataset, c.data.train_files, c.data.cache_dir = '', str(path), str(tmp_path / 'cache')
  return c


def _metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ('wall_seconds', 'tokens_per_second', 'mfu', 'time')} for r in rows]


def _warm_config(tmp_path):
  c = _corpus(tmp_path, tiny_config())
  c.num_train_steps, c.checkpoint_every_steps, c.max_checkpoints_to_keep = 6, 2, 10
  c.log_every_steps, c.eval_every_steps = 1, 6
  c.seq_len_warmup, c.batch_size_warmup = '16:3', '4:3'  # steps 0-2: 4 rows x 16 tokens, then 8 x 32
  c.masking.rate, c.masking.rate_schedule, c.masking.final_rate, c.masking.schedule_steps = 0.6, 'step', 0.15, 2
  return c


@pytest.fixture(scope='module')
def warm_run(tmp_path_factory):
  """A real run with the rate schedule and both warm-ups: (config, workdir, final eval)."""
  tmp_path = tmp_path_factory.mktemp('warm')
  c = _warm_config(tmp_path)
  workdir = str(tmp_path / 'full')
  return c, workdir, train.train_and_evaluate(c, workdir)


def test_train_step_masks_at_the_scheduled_rate_with_a_budget_per_length(tok):
  """The jitted train step takes the rate from its step and the prediction budget from the batch's length."""
  from mlm_flax import parallel  # pylint: disable=g-import-not-at-top
  from mlm_flax.models import make_model  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.model.vocab_size, c.model.pad_token_id = len(tok), tok.pad_token_id
  c.masking.rate, c.masking.rate_schedule, c.masking.final_rate, c.masking.schedule_steps = 0.6, 'step', 0.15, 1
  mesh, model, tx = parallel.make_mesh(1), make_model(c.model), train.make_optimizer(c.optimizer, 10)
  mask_fn, _ = mlm.make_mask_fn(c, tok)
  state = train.create_train_state(jax.random.PRNGKey(0), model, tx, 32)
  step = train.jit_train_step(model, tx, mask_fn, functools.partial(mlm.prediction_budget, c), mesh)
  counts = []
  ids = np.asarray(_ids(tok, 4, 16))  # a warm-up phase of 4 x 16 (shorter than max_seq_length=32); one compile
  for _ in range(2):  # the rate: 60% at step 0, 15% from step 1
    state, metrics = step(state, {'input_ids': ids, 'segment_ids': np.ones_like(ids),
                                  'positions': np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape).copy()})
    counts.append(float(metrics['count']))
  # Exact counts per row; a budget of max_seq_length's 19 predictions would not fit rows of 16 (top_k fails).
  assert counts == [4 * round(0.6 * 16), 4 * round(0.15 * 16)]


@pytest.mark.slow
def test_rate_schedule_and_warmups_reach_the_train_step(warm_run):
  """Each step's masked-token count equals the one planned from the real rows of its shape and its rate."""
  c, workdir, _ = warm_run
  counts = [r['num_masked_tokens'] for r in _metric_rows(workdir) if r['split'] == 'train']
  tok = tok_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  train_split = data.load_text_splits(c.data, c.seed)['train']
  rows_at = {n: data.packed_rows(train_split, tok, n, cache=c.data.cache_dir) for n in (16, 32)}
  batches = data.pipeline.phased_train_batches(rows_at, data.shape_phases(c), c.seed)
  rate = masking.rate_schedule('step', 0.6, 0.15, 2)
  specials = np.asarray(tok_lib.special_token_ids(tok))
  planned = []
  for step in range(6):
    batch, _ = next(batches)
    n = ((batch['segment_ids'] > 0) & ~np.isin(batch['input_ids'], specials)).sum(-1)
    planned.append(int(np.maximum(1, np.floor(np.float32(rate(step)) * n.astype(np.float32) + 0.5)).sum()))
  assert counts == planned, (counts, planned)
  assert planned[0] > 3 * planned[2] and planned[3] > 2 * planned[2]  # 60% -> 15%; 4 x 16 -> 8 x 32 tokens


@pytest.mark.slow
def test_warmup_run_resumed_across_a_phase_boundary_equals_the_uninterrupted_run(warm_run, tmp_path):
  """A copy of the run cut back to its step-2 checkpoint (inside the first phase) and resumed ends with the
  same params, metrics and eval as the uninterrupted run."""
  c, full, final = warm_run
  cut = str(tmp_path / 'cut')
  shutil.copytree(full, cut)
  for name in os.listdir(os.path.join(cut, 'checkpoints')):
    if name.isdigit() and int(name) > 2:
      shutil.rmtree(os.path.join(cut, 'checkpoints', name))
  assert train.train_and_evaluate(c, cut) == final
  assert _metric_rows(cut) == _metric_rows(full)
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  a, b = inference.load(full), inference.load(cut)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def test_schedule_choices_copy_the_masking_module():
  assert validation.CHOICES['masking.rate_schedule'] == masking.RATE_SCHEDULES


@pytest.mark.parametrize('overrides, message', [
    ({'masking.rate_schedule': 'linear'}, 'masking.final_rate, which is unset; set it'),
    ({'masking.rate_schedule': 'cosin'}, "Did you mean 'cosine'"),
    ({'masking.final_rate': 1.5}, 'masking.final_rate=1.5 must be a fraction'),
    ({'masking.schedule_steps': -1}, 'schedule_steps=-1 must be >= 0'),
    ({'seq_len_warmup': '16'}, "not a list of VALUE:STEPS phases; write e.g. --config.seq_len_warmup='32:200"),
    ({'seq_len_warmup': '32:10'}, 'below max_seq_length=32'),
    ({'seq_len_warmup': '16:10,8:10'}, 'values increasing'),
    ({'batch_size_warmup': '4:0'}, 'STEPS >= 1'),
    ({'batch_size_warmup': '3:10'}, 'batch size 3 must be a multiple of 2'),
    ({'seq_len_warmup': '16:10', 'data.streaming': True}, 'needs packed (non-streaming) data'),
])
def test_config_errors_name_the_key_and_the_fix(overrides, message):
  c = tiny_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError) as e:
    validation.validate_config(c, num_devices=2)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.slow
def test_time_to_accuracy_race_runs_end_to_end(tmp_path):
  """experiments/time_to_accuracy/run.py at a tiny budget on a small local corpus: every output written, the peer
  scored through `mlm-flax import` + `mlm-flax eval` on the same masks as ours."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  pytest.importorskip('accelerate')  # the Trainer's dependency
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(''.join(t + '\n' for t in _texts(600)))
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments',
                        'time_to_accuracy', 'run.py')
  out = subprocess.run([sys.executable, script, '--budget_minutes', '0.1', '--peer_lrs', '1e-3', '--sweep_fraction',
                        '0.2', '--arms', 'ours,ours-seq-warmup,ours-bert', '--probe_steps', '6', '--peer_probe_steps', '4',
                        '--root', str(tmp_path / 'root'), '--results', str(tmp_path / 'results'),
                        '--train_files', str(corpus)], capture_output=True, text=True, timeout=3000)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(tmp_path / 'results' / 'results.json') as f:
    results = json.load(f)
  assert set(results['runs']) == {'peer', 'ours', 'ours-seq-warmup', 'ours-bert'}
  assert results['peer_sweep'].keys() == {'0.001'}
  for arm, model_type in (('ours', 'modernbert'), ('ours-bert', 'bert')):  # the quick start; the other config
    with open(tmp_path / 'root' / arm / 'config.json') as f:
      assert json.load(f)['model']['type'] == model_type
  assert results['runs']['ours-bert']['probe']['tokens_per_second'] > 0  # probed on its own
  assert len(results['runs']['peer']['curve']) >= 1 and results['eval']['num_masked_tokens'] > 0
  assert {'model_name', 'avx512_bf16', 'amx_bf16'} <= set(results['machine']['cpu'])
  assert results['runs']['ours-seq-warmup']['overrides']['seq_len_warmup'].startswith('32:')
  assert (tmp_path / 'results' / 'accuracy_vs_time.png').stat().st_size > 0
  assert 'speed-up' in (tmp_path / 'results' / 'results.md').read_text()
  # --no_peer: our arms only (the ablation table), no target and no speed-ups.
  out = subprocess.run([sys.executable, script, '--no_peer', '--budget_minutes', '0.1', '--arms', 'ours,ours-15',
                        '--probe_steps', '6', '--root', str(tmp_path / 'root2'), '--results', str(tmp_path / 'abl'),
                        '--train_files', str(corpus)], capture_output=True, text=True, timeout=3000)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(tmp_path / 'abl' / 'results.json') as f:
    ablation = json.load(f)
  assert set(ablation['runs']) == {'ours', 'ours-15'} and ablation['peer'] is None
  assert ablation['peer_final_accuracy'] is None and ablation['runs']['ours-15']['speed_up'] is None
  assert ablation['runs']['ours-15']['overrides']['masking.rate'] == 0.15
  assert 'vs the quick start' in (tmp_path / 'abl' / 'results.md').read_text()
