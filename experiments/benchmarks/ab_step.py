"""A/B of the equal-recipe training step between two checkouts: alternating processes of
`workers/mlm_flax_step.py`, one per (round, dtype, checkout), so that a shared, noisy CPU hits both alike.

  python experiments/benchmarks/ab_step.py --a /tmp/base --b . --rounds 3 [--dtypes bfloat16,float32]
  python experiments/benchmarks/ab_step.py --a . --b . --b_xla_flags=--xla_cpu_prefer_vector_width=512
  python experiments/benchmarks/ab_step.py --a . --b . --b_env OMP_WAIT_POLICY=PASSIVE

Prints each round's tokens/s and per dtype the median of A and B, the median of the per-round ratios B/A and
their spread (min-max).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(root: str, dtype: str, args: argparse.Namespace, xla_flags: str = '', extra_env: dict | None = None) -> float:
  """tokens/s of one worker process with `root` first on PYTHONPATH (and `xla_flags` added to XLA_FLAGS,
  `extra_env` set)."""
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(root), 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
         **(extra_env or {})}
  if xla_flags:
    env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  cmd = [sys.executable, os.path.join(HERE, 'workers', 'mlm_flax_step.py'), '--config', args.config,
         '--dtype', dtype, '--steps', str(args.steps), '--warmup', str(args.warmup)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  line = next(l for l in out.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])['tokens_per_second']


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--a', required=True, help='the baseline checkout')
  p.add_argument('--b', required=True, help='the changed checkout')
  p.add_argument('--config', default=os.path.join(HERE, '..', '..', 'configs', 'tiny.py'))
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument('--b_xla_flags', default='', help="B's extra XLA_FLAGS (A/B of a flag: the same --a and --b)")
  p.add_argument('--b_env', action='append', default=[], metavar='NAME=VALUE',
                 help="an environment variable of B's processes (repeatable; A/B of a setting: the same --a and --b)")
  args = p.parse_args()
  b_env = dict(item.split('=', 1) for item in args.b_env)
  results = {d: {'a': [], 'b': []} for d in args.dtypes.split(',')}
  for r in range(args.rounds):
    for dtype, res in results.items():
      order = ('a', 'b') if r % 2 == 0 else ('b', 'a')
      for which in order:
        b = which == 'b'
        res[which].append(run(getattr(args, which), dtype, args, args.b_xla_flags if b else '', b_env if b else None))
      print(f'round {r} {dtype}: A {res["a"][-1]:.0f} B {res["b"][-1]:.0f} tokens/s', flush=True)
  for dtype, res in results.items():
    ratios = [b / a for a, b in zip(res['a'], res['b'])]
    print(f'{dtype}: A median {statistics.median(res["a"]):.0f}, B median {statistics.median(res["b"]):.0f} '
          f'tokens/s; B/A median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})')


if __name__ == '__main__':
  main()
