"""Shared by the step workers: the argument list, synthetic MLM data and the JSON report.

Each worker runs one framework's training step in its own process (so peak memory is its own),
on the same synthetic batch shape, and prints one JSON line. Only the Python standard library and
numpy are imported here, so the Hugging Face Flax worker can use it from its own old venv.
"""

import argparse
import json
import resource
import time

import numpy as np

MASK_ID, SPECIALS = 103, (0, 100, 101, 102, 103)  # BERT uncased: [PAD] [UNK] [CLS] [SEP] [MASK]


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser()
  for name in ('layers', 'hidden', 'heads', 'ffn', 'seq', 'batch'):
    p.add_argument(f'--{name}', type=int)  # required without --config
  p.add_argument('--vocab', type=int, default=30522)
  # The equal-recipe mode: a configs/*.py file whose model, masking rate, batch, length and vocabulary the
  # workers read (`recipe.py`); `--layers` ... are then ignored.
  p.add_argument('--config', default=None)
  p.add_argument('--compile', action='store_true', help='torch workers: torch.compile the model')
  p.add_argument('--sparse', action='store_true', help='torch ModernBERT: its sparse_prediction (head at masked positions)')
  p.add_argument('--attn', default='sdpa', help='torch ModernBERT: attn_implementation (sdpa, eager)')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--mask_rate', type=float, default=0.15)
  # mlm_flax ablations (the other workers ignore them): `--override model.KEY=VALUE` (Python literal),
  # `--head_everywhere` computes the MLM head at every position, as the Hugging Face step does.
  p.add_argument('--override', action='append', default=[])
  p.add_argument('--head_everywhere', action='store_true')
  args = p.parse_args()
  if args.config:
    import recipe  # pylint: disable=g-import-not-at-top
    c = recipe.load(args.config)
    args.layers, args.hidden, args.heads, args.ffn = (c.model.num_layers, c.model.hidden_size, c.model.num_heads,
                                                      c.model.intermediate_size)
    args.seq, args.batch, args.vocab, args.mask_rate = c.max_seq_length, c.batch_size, c.model.vocab_size, c.masking.rate
  elif None in (args.layers, args.hidden, args.heads, args.ffn, args.seq, args.batch):
    p.error('give --config FILE or all of --layers --hidden --heads --ffn --seq --batch')
  return args


def token_ids(args, step: int) -> np.ndarray:
  """Random non-special ids [batch, seq], different each step."""
  rng = np.random.default_rng(step)
  return rng.integers(max(SPECIALS) + 1, args.vocab, (args.batch, args.seq)).astype(np.int32)


def bert_mask(args, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
  """Host-side 80/10/10 BERT masking (as Hugging Face collators do): inputs, labels (-100 = unscored)."""
  rng = np.random.default_rng(10_000 + step)
  chosen = rng.random(ids.shape) < args.mask_rate
  labels = np.where(chosen, ids, -100)
  u = rng.random(ids.shape)
  inputs = np.where(chosen & (u < 0.8), MASK_ID, ids)
  random_ids = rng.integers(max(SPECIALS) + 1, args.vocab, ids.shape)
  inputs = np.where(chosen & (u >= 0.8) & (u < 0.9), random_ids, inputs)
  return inputs.astype(np.int32), labels.astype(np.int64)


def timed(args, step_fn, sync) -> dict:
  """Runs `warmup` then `steps` calls of step_fn(i); `sync()` waits for the device. Step time = total / steps."""
  for i in range(args.warmup):
    step_fn(i)
  sync()
  start = time.perf_counter()
  for i in range(args.warmup, args.warmup + args.steps):
    step_fn(i)
  sync()
  seconds = (time.perf_counter() - start) / args.steps
  return {'step_seconds': seconds, 'tokens_per_second': args.batch * args.seq / seconds,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def report(result: dict) -> None:
  print('RESULT ' + json.dumps(result), flush=True)
