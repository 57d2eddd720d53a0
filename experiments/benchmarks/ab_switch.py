"""A/B of one trace-time switch in one process: the quick start's bf16 step built twice, A with a function of
`mlm_flax` replaced while it is traced (e.g. a kernel switched off), B as the code is; then blocks of steps
alternate A, B, B, A, ... so the machine's slow and fast spells (see README.md) fall on both. Separate processes
(`ab_step.py`) compare checkouts, but a round of each is seconds apart and the spells move their ratio by +-10%;
here the per-block ratio's median moves by ~1% (a no-op switch: 0.996).

    python experiments/benchmarks/ab_switch.py 'mlm_flax.kernels.onednn:cross_entropy_enabled=lambda dtype: False'
"""

import argparse
import importlib
import statistics

import step_profile


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('patch', help="'module:attribute=expression': A's replacement, in effect while A is traced")
  parser.add_argument('--config', default='quick_start', help='a step_profile config name')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--blocks', type=int, default=40, help='blocks of each side, alternating')
  parser.add_argument('--steps', type=int, default=10, help='steps per block')
  args = parser.parse_args()
  target, expression = args.patch.split('=', 1)
  module_name, attribute = target.split(':')
  module = importlib.import_module(module_name)
  original = getattr(module, attribute)
  setattr(module, attribute, eval(expression))  # pylint: disable=eval-used
  try:  # the first steps trace and compile A with the replacement
    step_a, state_a, batch = step_profile.build_jax_step(step_profile.config_for(args.config), args.dtype)
  finally:
    setattr(module, attribute, original)
  step_b, state_b, _ = step_profile.build_jax_step(step_profile.config_for(args.config), args.dtype)
  ms_a, ms_b = [], []
  for i in range(args.blocks):
    for side in ('ab' if i % 2 == 0 else 'ba'):
      if side == 'a':
        seconds, state_a = step_profile.time_jax_step(step_a, state_a, batch, args.steps)
        ms_a.append(seconds * 1e3)
      else:
        seconds, state_b = step_profile.time_jax_step(step_b, state_b, batch, args.steps)
        ms_b.append(seconds * 1e3)
  ratios = [a / b for a, b in zip(ms_a, ms_b)]
  low, _, high = statistics.quantiles(ratios, n=4)
  print(f'{step_profile.machine_line()}\nA ({args.patch}): median {statistics.median(ms_a):.2f} ms per step, fastest '
        f'block {min(ms_a):.2f}\nB (as the code is): median {statistics.median(ms_b):.2f} ms, fastest block '
        f'{min(ms_b):.2f}\nB/A speed: median of the {args.blocks} block pairs {statistics.median(ratios):.3f} '
        f'(quartiles {low:.3f}-{high:.3f}), '
        f'of the sums {sum(ms_a) / sum(ms_b):.3f}')


if __name__ == '__main__':
  main()
