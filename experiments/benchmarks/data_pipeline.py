"""Is the data pipeline ever the bottleneck? Step time with the real pipeline vs synthetic batches; tokenization.

    python experiments/benchmarks/data_pipeline.py [--steps 20] [--rounds 4]

(a) For `configs/tiny.py` and a small BERT (4 layers, hidden 512, 8 heads, FFN 2048, seq 128, batch 32),
    the mean train-step time over `--steps` steps after warm-up, alternating in `--rounds`: the real pipeline
    (`data.train_iterator`: batches sliced, placed on the mesh and prefetched on a background thread) and
    one synthetic batch of the same shapes, placed on the devices beforehand. Also the pipeline alone
    (batches/s with no step). Masking runs in-graph in both.
(b) Tokenization + packing throughput (tokens/s) of the built-in corpus's train split: cold (a fresh cache
    dir: `datasets.map` and the packed-rows cache both empty) and cached (the second call).
Writes JSON and a markdown table to experiments/benchmarks/results/.
"""

import argparse
import functools
import json
import os
import platform
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import jax  # pylint: disable=g-import-not-at-top

from mlm_flax.configs import tiny
from mlm_flax import data, parallel, train
from mlm_flax.data import tokenizer
from mlm_flax.models import make_model


def _configs():
  small = tiny.get_config()
  small.model.num_layers, small.model.hidden_size, small.model.num_heads = 4, 512, 8
  small.model.intermediate_size = 2048
  small.max_seq_length, small.batch_size = 128, 32
  small.data.tokenizer_vocab_size = 8192
  return {'tiny': tiny.get_config(), 'small': small}


def _step_times(config, steps: int, rounds: int) -> dict:
  splits = data.load_text_splits(config.data, config.seed)
  tok = tokenizer.get_tokenizer(config.data, lambda: data.tokenizer_texts(splits['train']), None,
                                data.fingerprint(splits['train'], config.data), data.cache_dir(config.data))
  config = train.resolve_config(config, tok)
  rows = data.packed_rows(splits['train'], tok, config.max_seq_length, config.data.packing,
                          cache=data.cache_dir(config.data))
  mesh = parallel.make_mesh()
  model = make_model(config.model)
  tx = train.make_optimizer(config.optimizer, config.num_train_steps)
  step_fn = train.jit_train_step(model, tx, *train.make_mask_fn(config, tok), mesh)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=config.max_seq_length),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  synthetic = parallel.to_global({k: v[:config.batch_size] for k, v in rows.items()}, mesh)
  jax.block_until_ready(synthetic)

  def timed(next_batch, n: int) -> float:
    nonlocal state
    state, m = step_fn(state, next_batch())  # warm-up: compilation, the prefetch thread filling up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(n):
      state, m = step_fn(state, next_batch())
    jax.block_until_ready(m)
    return time.perf_counter() - start

  # Alternate in rounds (and the order within a round) so drifting load on a shared machine hits both.
  per_round = max(1, steps // rounds)
  real, synth, alone = [], [], []
  for r in range(rounds):
    with data.train_iterator(config, rows, tok, mesh, start_step=r * (per_round + 1)) as it:
      order = [('real', lambda: next(it)[0]), ('synthetic', lambda: synthetic)]
      for name, next_batch in (order if r % 2 == 0 else order[::-1]):
        (real if name == 'real' else synth).append(timed(next_batch, per_round))
      start = time.perf_counter()
      for _ in range(per_round):
        jax.block_until_ready(next(it)[0])
      alone.append(time.perf_counter() - start)
  n = per_round * rounds
  real_s, synth_s = sum(real) / n, sum(synth) / n
  return {'batch': config.batch_size, 'seq': config.max_seq_length, 'params_m': round(sum(
      x.size for x in jax.tree.leaves(state.params)) / 1e6, 1), 'real_step_ms': 1e3 * real_s,
          'synthetic_step_ms': 1e3 * synth_s, 'overhead_pct': 100 * (real_s / synth_s - 1),
          'pipeline_alone_batches_per_s': n / sum(alone), 'rounds': {
              'real_ms': [1e3 * x / per_round for x in real], 'synthetic_ms': [1e3 * x / per_round for x in synth]}}


def _tokenization(vocab_size: int) -> dict:
  config = tiny.get_config()
  config.data.tokenizer_vocab_size = vocab_size
  splits = data.load_text_splits(config.data, config.seed)
  tok = tokenizer.get_tokenizer(config.data, lambda: data.tokenizer_texts(splits['train']), None,
                                data.fingerprint(splits['train'], config.data), data.cache_dir(config.data))
  out = {}
  with tempfile.TemporaryDirectory() as fresh:
    config.data.cache_dir = fresh
    corpus = data.load_text_splits(config.data, config.seed)['train']  # built and loaded: not timed
    for name in ('cold', 'cached'):
      start = time.perf_counter()
      rows = data.packed_rows(corpus, tok, config.max_seq_length, cache=fresh)
      seconds = time.perf_counter() - start
      tokens = int((rows['segment_ids'] > 0).sum())
      out[name] = {'seconds': seconds, 'tokens': tokens, 'tokens_per_s': tokens / seconds}
  out['documents'] = len(corpus)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=4, help='alternations; --steps are split over them')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = parser.parse_args()
  result = {'date': time.strftime('%Y-%m-%d'), 'machine': f'{platform.processor() or platform.machine()}, '
            f'{os.cpu_count()} CPUs, {jax.devices()[0].platform} x{jax.device_count()}',
            'jax': jax.__version__, 'steps': args.steps,
            'step_time': {name: _step_times(c, args.steps, args.rounds) for name, c in _configs().items()},
            'tokenization': _tokenization(tiny.get_config().data.tokenizer_vocab_size)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'data_pipeline.json'), 'w') as f:
    json.dump(result, f, indent=2)
  lines = ['| config | batch x seq | params (M) | step, real pipeline (ms) | step, synthetic batch (ms) | '
           'overhead | pipeline alone (batches/s) |', '|---|---|---:|---:|---:|---:|---:|']
  for name, r in result['step_time'].items():
    lines.append(f"| {name} | {r['batch']} x {r['seq']} | {r['params_m']} | {r['real_step_ms']:.1f} | "
                 f"{r['synthetic_step_ms']:.1f} | {r['overhead_pct']:+.1f}% | {r['pipeline_alone_batches_per_s']:.0f} |")
  t = result['tokenization']
  lines += ['', f"| tokenize + pack, built-in corpus ({t['documents']} docs, {t['cold']['tokens']} tokens) "
            '| seconds | tokens/s |', '|---|---:|---:|']
  for name in ('cold', 'cached'):
    lines.append(f"| {name} | {t[name]['seconds']:.2f} | {t[name]['tokens_per_s']:,.0f} |")
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'data_pipeline.md'), 'w') as f:
    f.write(table + '\n')
  print(table)


if __name__ == '__main__':
  main()
