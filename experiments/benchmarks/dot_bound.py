"""How fast our training step would be with PyTorch's matmul kernels: the step's own matmuls, timed alone in XLA:CPU
and in PyTorch (oneDNN), against the equal-recipe peer's whole step.

    python experiments/benchmarks/dot_bound.py                      # the quick start's recipe, bf16
    python experiments/benchmarks/dot_bound.py --size base          # the same recipe at ModernBERT-base's shape

Every dot of our compiled step (`train.jit_train_step`; forward, backward, head, attention: read from the
optimized HLO, with its operand shapes, dtypes and dimension numbers) runs alone, jitted as that one
`lax.dot_general` (f32 accumulation and output, as in the step), and as the same contraction in `torch.einsum`
on the same dtypes (bf16 in, bf16 out, as under autocast). With the step timed as the training loop runs it and
the peer's step (`step_profile.build_torch_step`: eager attention, head at every position, bf16 autocast,
`torch.compile` unless `--no_compile`; under OpenMP's default wait policy and under PASSIVE, the faster
counting, with its dots) in the same run, the table says how much of the gap to the peer is the
matmul library, and how our step would compare with oneDNN's kernels: our step - our matmuls alone + the same
matmuls alone in PyTorch. Alone, a dot runs with both cores to itself, so the in-step figures differ; treat
the bound as an estimate. Writes results/dot_bound_<size>.{json,md}.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, 'workers')]

import step_profile  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

REPEATS = 10


def step_dots(hlo: str) -> list[dict]:
  """Each dot of an optimized HLO module: operand shapes and dtypes, dimension numbers and the JAX op name."""
  dots = []
  for comp in re.split(r'\n(?=\S)', hlo):  # computations start at column 0
    shapes = {}
    header = re.match(r'(?:ENTRY )?%?\S+ \((.*?)\) ->', comp)
    if header:
      shapes.update((m.group(1), m.group(2)) for m in re.finditer(r'([\w.\-]+): (\w+\[[\d,]*\])', header.group(1)))
    for line in comp.splitlines():
      m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w+)\((.*?)\)', line)
      if not m:
        continue
      shapes[m.group(1)] = m.group(2)
      if m.group(3) != 'dot':
        continue
      dims = lambda key: [int(x) for x in (re.search(key + r'=\{([\d,]*)\}', line) or ['', ''])[1].split(',') if x]
      lhs, rhs = (shapes[o.strip().lstrip('%')] for o in m.group(4).split(','))
      name = re.search(r'op_name="([^"]*)"', line)
      dots.append({'lhs': lhs, 'rhs': rhs, 'dims': [dims('lhs_contracting_dims'), dims('rhs_contracting_dims'),
                                                     dims('lhs_batch_dims'), dims('rhs_batch_dims')],
                   'name': name.group(1) if name else ''})
  return dots


def _shape(text: str) -> tuple[str, list[int]]:
  dtype, dims = re.match(r'(\w+)\[([\d,]*)\]', text).groups()
  return dtype, [int(d) for d in dims.split(',') if d]


def dot_flops(dot: dict) -> float:
  (_, ls), (_, rs) = _shape(dot['lhs']), _shape(dot['rhs'])
  lc, rc, lb, _ = dot['dims']
  contracted = 1
  for i in lc:
    contracted *= ls[i]
  out = 1
  for i, n in enumerate(ls):
    out *= 1 if i in lc else n
  for j, n in enumerate(rs):
    out *= 1 if j in rc or j in dot['dims'][3] else n
  return 2.0 * out * contracted


def einsum_spec(dot: dict) -> str:
  """The torch.einsum spec of a dot_general (output: batch, lhs free, rhs free dims, as XLA orders them)."""
  (_, ls), (_, rs) = _shape(dot['lhs']), _shape(dot['rhs'])
  lc, rc, lb, rb = dot['dims']
  left = list('abcdefgh'[:len(ls)])
  right = [None] * len(rs)
  for i, j in list(zip(lc, rc)) + list(zip(lb, rb)):
    right[j] = left[i]
  fresh = iter('pqrstuvw')
  right = [r or next(fresh) for r in right]
  out = ([left[i] for i in lb] + [left[i] for i in range(len(ls)) if i not in lc + lb] +
         [right[j] for j in range(len(rs)) if j not in rc + rb])
  return f"{''.join(left)},{''.join(right)}->{''.join(out)}"


def median_seconds(fn) -> float:
  for _ in range(3):  # oneDNN makes its kernel on the first call of a shape
    fn()
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def ours(size: str, dtype: str, steps: int, step_only: bool = False) -> dict:
  """Our step's time and HLO dots, each dot timed alone in XLA (`step_only`: the time alone)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  c = step_profile.config_for(size)
  step, state, batch = step_profile.build_jax_step(c, dtype)
  hlo = None if step_only else step.lower(state, batch).compile().as_text()  # compiled apart from the jit cache
  step_s, state = step_profile.time_jax_step(step, state, batch, steps)
  del state
  if step_only:
    return {'step_ms': step_s * 1000}
  dots = step_dots(hlo)
  for d in dots:
    (lt, ls), (rt, rs) = _shape(d['lhs']), _shape(d['rhs'])
    a, b = jnp.ones(ls, lt.replace('bf16', 'bfloat16').replace('f32', 'float32')), jnp.ones(
        rs, rt.replace('bf16', 'bfloat16').replace('f32', 'float32'))
    lc, rc, lb, rb = d['dims']
    f = jax.jit(lambda x, y, dn=((lc, rc), (lb, rb)): jax.lax.dot_general(x, y, dn, preferred_element_type=jnp.float32))
    d['xla_ms'] = median_seconds(lambda: f(a, b).block_until_ready()) * 1000
  return {'step_ms': step_s * 1000, 'dots': dots}


def peer(size: str, dtype: str, steps: int, compiled: bool, dots: list[dict]) -> dict:
  """The peer's step time, and each of our dots timed alone as a torch.einsum."""
  import torch  # pylint: disable=g-import-not-at-top
  c = step_profile.config_for(size)
  run = step_profile.build_torch_step(c, dtype, compiled)
  step_s = step_profile.time_torch_step(run, steps)
  to_torch = {'bf16': torch.bfloat16, 'f32': torch.float32}
  for d in dots:
    (lt, ls), (rt, rs) = _shape(d['lhs']), _shape(d['rhs'])
    a, b, spec = torch.randn(ls, dtype=to_torch[lt]), torch.randn(rs, dtype=to_torch[rt]), einsum_spec(d)
    d['torch_ms'] = median_seconds(lambda: torch.einsum(spec, a, b)) * 1000
  return {'step_ms': step_s * 1000, 'dots': dots}


def summary(size: str, dtype: str, mine: dict, theirs: dict, compiled: bool, machine: str) -> str:
  xla = sum(d['xla_ms'] for d in mine['dots'])
  onednn = sum(d['torch_ms'] for d in theirs['dots'])
  gflop = sum(dot_flops(d) for d in mine['dots']) / 1e9
  bound = mine['step_ms'] - xla + onednn
  peer_name = (f"the peer's step ({'torch.compile' if compiled else 'eager'}, {dtype}, OpenMP wait policy "
               f"{theirs['policy']})")
  rows = [("our step with oneDNN's matmuls (`MLM_FLAX_CPU_MATMUL=auto`, the default)", mine['onednn_step_ms'],
           f"ours: {theirs['step_ms'] / mine['onednn_step_ms']:.2f}x"),
          ("our step with XLA's dots (`MLM_FLAX_CPU_MATMUL=xla`)", mine['step_ms'], ''),
          (f"its {len(mine['dots'])} matmuls alone, XLA:CPU ({gflop:.1f} GFLOP)", xla,
           f'{gflop / xla * 1000:.0f} GFLOP/s'),
          ('the same matmuls alone, PyTorch (oneDNN)', onednn, f'{gflop / onednn * 1000:.0f} GFLOP/s'),
          ('our step less its matmuls (everything else)', mine['step_ms'] - xla, ''),
          (peer_name, theirs['step_ms'], f"ours: {theirs['step_ms'] / mine['step_ms']:.2f}x"),
          ("the peer's step less the same matmuls' oneDNN time (approx.: its head runs at every position)",
           theirs['step_ms'] - onednn, ''),
          ("our step with PyTorch's matmul times (estimate)", bound, f"{theirs['step_ms'] / bound:.2f}x the peer")]
  lines = [f'Matmul bound, {size}, {dtype} ({machine}):', '', '| | ms per step | |', '|---|---:|---|']
  lines += [f'| {name} | {ms:.1f} | {note} |' for name, ms, note in rows]
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='quick_start', choices=('quick_start', 'base'))
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--no_compile', action='store_true', help="time the eager peer instead of torch.compile's")
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  parser.add_argument('--_ours', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--_step_only', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--_peer', help=argparse.SUPPRESS)  # a JSON file of our dots, in the peer's subprocess
  args = parser.parse_args()
  compiled = not args.no_compile
  if args._ours:  # pylint: disable=protected-access
    print('RESULT ' + json.dumps(ours(args.size, args.dtype, args.steps, args._step_only)))  # pylint: disable=protected-access
    return
  if args._peer:  # pylint: disable=protected-access
    with open(args._peer) as f:  # pylint: disable=protected-access
      dots = json.load(f)
    print('RESULT ' + json.dumps(peer(args.size, args.dtype, args.steps, compiled, dots)))
    return

  def sub(*extra: str, passive: bool = False, matmul: str = 'auto') -> dict:  # each in its own process
    cmd = [sys.executable, os.path.abspath(__file__), '--size', args.size, '--dtype', args.dtype, '--steps',
           str(args.steps), *(['--no_compile'] if args.no_compile else []), *extra]
    env = {**train_step.torch_env(dict(os.environ), passive=passive), 'MLM_FLAX_CPU_MATMUL': matmul}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[len('RESULT '):])

  # Our dots as XLA runs them (the bound's accounting), and our default step (oneDNN's matmuls where it runs).
  mine = {**sub('--_ours', matmul='xla'), 'onednn_step_ms': sub('--_ours', '--_step_only')['step_ms']}
  os.makedirs(args.out, exist_ok=True)
  dots_file = os.path.join(args.out, f'dot_bound_{args.size}.dots.json')
  with open(dots_file, 'w') as f:
    json.dump(mine['dots'], f)
  try:  # the peer under OpenMP's default wait policy and under PASSIVE (train_step.PASSIVE): the faster counts
    runs = {policy: sub('--_peer', dots_file, passive=policy == 'PASSIVE') for policy in ('default', 'PASSIVE')}
  finally:
    os.remove(dots_file)
  policy = min(runs, key=lambda p: runs[p]['step_ms'])
  theirs = {**runs[policy], 'policy': policy}
  machine = step_profile.machine_line()
  md = summary(args.size, args.dtype, mine, theirs, compiled, machine)
  per_dot = [{**d, 'torch_ms': t['torch_ms'], 'gflop': dot_flops(d) / 1e9}
             for d, t in zip(mine['dots'], theirs['dots'])]
  with open(os.path.join(args.out, f'dot_bound_{args.size}.json'), 'w') as f:
    json.dump({'machine': machine, 'args': vars(args), 'our_step_ms': mine['step_ms'],
               'our_onednn_step_ms': mine['onednn_step_ms'],
               'peer_step_ms': {p: r['step_ms'] for p, r in runs.items()}, 'peer_policy': policy, 'dots': per_dot},
              f, indent=1)
  with open(os.path.join(args.out, f'dot_bound_{args.size}.md'), 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
