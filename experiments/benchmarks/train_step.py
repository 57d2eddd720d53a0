"""MLM training-step benchmark: mlm_flax vs Hugging Face's Flax example vs PyTorch, one run, alternating.

    python experiments/benchmarks/train_step.py                       # the full grid (~30 min on 2 cores)
    python experiments/benchmarks/train_step.py --sizes small --seq_lens 128 --rounds 3

For each size (small: 4 layers, hidden 512, 8 heads, FFN 2048; base: 12, 768, 12, 3072) and sequence
length (128, 512), at 4,096 tokens per step (batch 32 x 128, 8 x 512) and vocabulary 30,522, every
framework runs in its own process (so peak memory is its own), in rotating order per round:

  mlm_flax     `train.jit_train_step`, default precision (`model.dtype='auto'`)
  hf_flax      the step of transformers 4.x `run_mlm_flax.py` (host numpy collator, `pmap`, head at every
               position), in a venv of its own (`--hf_venv`, built on first use)
  torch_fp32   transformers `BertForMaskedLM` + `torch.optim.AdamW`
  torch_bf16   the same under `torch.autocast('cpu', bfloat16)`
  *_passive    a torch worker under OMP_WAIT_POLICY=PASSIVE (faster on a loaded machine; see PASSIVE)

MFU is model FLOPs (`mlm_flax.flops`, 15% masked) per second over this machine's measured matmul peak
(the best of JAX and torch, f32 and bf16), so it is against this machine, not a datasheet. Writes
`results/train_step.json` and `results/train_step.md`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {'small': dict(layers=4, hidden=512, heads=8, ffn=2048),
         'base': dict(layers=12, hidden=768, heads=12, ffn=3072)}
WORKERS = {'mlm_flax': ('mlm_flax_step.py', 'auto'), 'hf_flax': ('hf_flax_step.py', 'float32'),
           'torch_fp32': ('torch_step.py', 'float32'), 'torch_bf16': ('torch_step.py', 'bfloat16'),
           # The equal-recipe grid (`--config configs/tiny.py`): each precision of ours, and the PyTorch peer
           # (`ModernBertForMaskedLM` of the same config) in its variants; its fastest is the peer.
           'mlm_flax_fp32': ('mlm_flax_step.py', 'float32'), 'mlm_flax_bf16': ('mlm_flax_step.py', 'bfloat16'),
           'torch_modernbert_fp32': ('torch_modernbert_step.py', 'float32', '--attn=eager'),
           'torch_modernbert_bf16': ('torch_modernbert_step.py', 'bfloat16', '--attn=eager'),
           'torch_modernbert_bf16_sdpa': ('torch_modernbert_step.py', 'bfloat16', '--attn=sdpa'),
           'torch_modernbert_fp32_compile': ('torch_modernbert_step.py', 'float32', '--attn=eager', '--compile'),
           'torch_modernbert_bf16_compile': ('torch_modernbert_step.py', 'bfloat16', '--attn=eager', '--compile')}
# OpenMP's wait policy is worth a variant of its own: its default (threads spin a while between parallel regions)
# is fastest on a quiet machine (torch.compile bf16 at the quick start: 32-33k tokens/s against 23k with
# OMP_WAIT_POLICY=PASSIVE, 2026-12-04), PASSIVE on a loaded one (spinning threads fight other processes). Every
# torch worker runs under OpenMP's default (an OMP_WAIT_POLICY in the caller's environment is dropped); each
# `_passive` variant under PASSIVE.
PASSIVE = 'OMP_WAIT_POLICY=PASSIVE'
WORKERS.update({f'{name}_passive': (*WORKERS[name], PASSIVE) for name in
                ('torch_fp32', 'torch_bf16', 'torch_modernbert_fp32_compile', 'torch_modernbert_bf16_compile')})


def torch_env(env: dict, passive: bool = False) -> dict:
  """`env` for a torch process: OpenMP's default wait policy (an OMP_WAIT_POLICY in `env` dropped), or PASSIVE."""
  env = {k: v for k, v in env.items() if k != 'OMP_WAIT_POLICY'}
  return {**env, 'OMP_WAIT_POLICY': 'PASSIVE'} if passive else env


BERT_FRAMEWORKS = 'mlm_flax,hf_flax,torch_fp32,torch_bf16,torch_fp32_passive,torch_bf16_passive'
RECIPE_FRAMEWORKS = ','.join(['mlm_flax_fp32', 'mlm_flax_bf16', 'torch_modernbert_fp32', 'torch_modernbert_bf16',
                              'torch_modernbert_bf16_sdpa', 'torch_modernbert_fp32_compile',
                              'torch_modernbert_bf16_compile', 'torch_modernbert_fp32_compile_passive',
                              'torch_modernbert_bf16_compile_passive'])
# What run_mlm_flax.py ran on: the last transformers with Flax models and the JAX/Flax of its time.
HF_REQUIREMENTS = ['transformers==4.46.3', 'flax==0.8.5', 'jax==0.4.30', 'jaxlib==0.4.30', 'optax==0.2.2',
                   'orbax-checkpoint==0.5.20', 'numpy<2']
VOCAB = 30522
# What each speed choice buys: the default step against the step with one choice undone (or one option on).
ABLATIONS = ('--override=model.vocab_multiple=1', '--head_everywhere', '--override=model.dtype=bfloat16',
             '--override=model.dtype=float32', '--override=model.attention=dot_product_attention',
             '--override=model.remat=True')


def hf_python(venv: str) -> str:
  """The Python of the Hugging Face Flax venv, creating it on first use (pip, ~1 minute)."""
  python = os.path.join(venv, 'bin', 'python')
  if not os.path.exists(python):
    print(f'Creating {venv} for the Hugging Face Flax step: {" ".join(HF_REQUIREMENTS)}', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
    subprocess.run([python, '-m', 'pip', 'install', '-q', *HF_REQUIREMENTS], check=True)
  return python


def matmul_peaks(n: int = 2048) -> dict:
  """FLOP/s of matmuls (n^3; torch bf16 (n/4)^3), in JAX and torch, f32 and bf16 (f32 accumulation in JAX)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import torch
  from mlm_flax import flops
  peaks = {f'jax_{d}': flops.measure_matmul_peak(d, n) for d in ('float32', 'bfloat16')}
  torch.set_num_threads(os.cpu_count())
  # torch's bf16 matmul is emulated (and slow: ~100x under f32) on CPUs without AVX512-BF16/AMX: a smaller n.
  for name, dtype, m in (('float32', torch.float32, n), ('bfloat16', torch.bfloat16, n // 4)):
    a = torch.ones(m, m, dtype=dtype)
    a @ a
    best = min(_time(lambda: a @ a) for _ in range(3))
    peaks[f'torch_{name}'] = 2 * m ** 3 / best
  del jax, jnp
  return peaks


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_worker(framework: str, shape: dict, args, python: str, env: dict, extra: tuple = ()) -> dict:
  script, dtype, *flags = WORKERS[framework]
  if script.startswith('torch'):  # OpenMP's default wait policy unless the variant says PASSIVE (see PASSIVE)
    env = torch_env(env, passive=PASSIVE in flags)
    flags = [f for f in flags if f != PASSIVE]
  cmd = [python, os.path.join(HERE, 'workers', script), '--vocab', str(VOCAB), '--dtype', dtype,
         '--steps', str(args.steps), '--warmup', str(args.warmup), *flags]
  if args.config:  # the recipe's own shapes and model (the workers read the file)
    cmd += ['--config', args.config]
  else:
    cmd += [f'--{k}={v}' for k, v in shape.items()]
  cmd += list(extra)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{framework} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def row(size: str, shape: dict, framework: str, results: list[dict], fpt: float, peak: float) -> dict:
  """One table row from a framework's worker results: the median tokens/s, the largest peak RSS."""
  tps = statistics.median(r['tokens_per_second'] for r in results)
  return {'size': size, 'seq': shape['seq'], 'batch': shape['batch'], 'framework': framework,
          'dtype': results[0]['dtype'], 'devices': results[0]['devices'], 'tokens_per_second': tps,
          'step_seconds': shape['batch'] * shape['seq'] / tps,
          'peak_rss_gb': max(r['peak_rss_mb'] for r in results) / 1024,
          'mfu': tps * fpt / peak, 'model_flops_per_token': fpt}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='small,base')
  parser.add_argument('--seq_lens', default='128,512')
  parser.add_argument('--frameworks', default=BERT_FRAMEWORKS)
  parser.add_argument('--tokens_per_step', type=int, default=4096)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=1, help='alternating rounds; the median is reported')
  parser.add_argument('--devices', default='1,8', help='CPU device counts for the mlm_flax scaling rows')
  parser.add_argument('--ablations', default=';'.join(ABLATIONS),
                      help="';'-separated mlm_flax variants (worker flags) measured against the default; '' skips")
  parser.add_argument('--ablation_rounds', type=int, default=3)
  parser.add_argument('--hf_venv', default=os.path.join(HERE, '.hf_flax_venv'))
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  parser.add_argument('--config', default=None,
                      help='equal-recipe mode: a configs/*.py file (e.g. configs/tiny.py) whose model, batch, length, '
                           f'vocabulary and masking rate every worker uses; default frameworks {RECIPE_FRAMEWORKS}')
  args = parser.parse_args()
  if args.config:
    recipe_main(args)
    return
  sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
  from mlm_flax import flops  # pylint: disable=g-import-not-at-top

  frameworks = args.frameworks.split(',')
  pythons = {f: hf_python(args.hf_venv) if f == 'hf_flax' else sys.executable for f in frameworks}
  peaks = matmul_peaks()
  peak = max(peaks.values())
  print('matmul peaks (GFLOP/s): ' + ', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items()), flush=True)
  env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(HERE))}
  rows = []
  for size in args.sizes.split(','):
    for seq in map(int, args.seq_lens.split(',')):
      shape = {**SIZES[size], 'seq': seq, 'batch': args.tokens_per_step // seq}
      fpt = flops.train_flops_per_token(shape['layers'], shape['hidden'], shape['ffn'], VOCAB, seq, 0.15)
      runs = {f: [] for f in frameworks}
      for r in range(args.rounds):
        for f in frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]:
          runs[f].append(run_worker(f, shape, args, pythons[f], env))
          print(f"{size} seq {seq} {f}: {runs[f][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
      rows += [row(size, shape, f, results, fpt, peak) for f, results in runs.items()]
  if 'mlm_flax' in frameworks:  # scaling over host-platform CPU devices (same cores, more partitions)
    size = args.sizes.split(',')[0]
    shape = {**SIZES[size], 'seq': 128, 'batch': args.tokens_per_step // 128}
    fpt = flops.train_flops_per_token(shape['layers'], shape['hidden'], shape['ffn'], VOCAB, 128, 0.15)
    for n in map(int, args.devices.split(',')):
      dev_env = {**env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
      res = run_worker('mlm_flax', shape, args, sys.executable, dev_env)
      rows.append(row(size, shape, f'mlm_flax ({n} CPU devices)', [res], fpt, peak))

  ablation_rows = ablate(args, env, peak) if args.ablations and 'mlm_flax' in frameworks else []

  ours = {(r['size'], r['seq']): r['tokens_per_second'] for r in rows if r['framework'] == 'mlm_flax'}
  lines = ['| size | seq × batch | framework | dtype | tokens/s | step (s) | peak RSS (GB) | MFU | mlm_flax speed-up |',
           '|---|---|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    r['mlm_flax_speedup'] = ours.get((r['size'], r['seq']), float('nan')) / r['tokens_per_second']
    lines.append(f"| {r['size']} | {r['seq']} × {r['batch']} | {r['framework']} | {r['dtype']} | "
                 f"{r['tokens_per_second']:.0f} | {r['step_seconds']:.2f} | {r['peak_rss_gb']:.2f} | "
                 f"{r['mfu']:.1%} | {r['mlm_flax_speedup']:.2f}x |")
  lines.append('')
  lines.append('Matmul peaks (GFLOP/s; 2048³, torch bf16 512³): ' + ', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items())
               + f'. MFU is against the best, {peak / 1e9:.0f} GFLOP/s.')
  if ablation_rows:
    lines += ['', f"Ablations ({ablation_rows[0]['size']}, seq 128, median of {args.ablation_rounds} alternating rounds):", '',
              '| mlm_flax variant | tokens/s | vs default |', '|---|---:|---:|']
    lines += [f"| {r['variant']} | {r['tokens_per_second']:.0f} | {r['vs_default']:.2f}x |" for r in ablation_rows]
  table = '\n'.join(lines) + '\n'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'train_step.json'), 'w') as f:
    json.dump({'machine': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
               'matmul_peaks': peaks, 'rows': rows, 'ablations': ablation_rows, 'args': vars(args)}, f, indent=2)
  with open(os.path.join(args.out, 'train_step.md'), 'w') as f:
    f.write(table)
  print(table)


def recipe_main(args) -> None:
  """The equal-recipe grid: every framework of `--frameworks` (default `RECIPE_FRAMEWORKS`) on the shapes and
  model of `--config`, `--rounds` alternating rounds; tokens/s and the speed-up of each of ours over the fastest
  peer of each precision. Writes results/recipe_step.{json,md}."""
  frameworks = (args.frameworks if args.frameworks != BERT_FRAMEWORKS else RECIPE_FRAMEWORKS).split(',')
  env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(HERE))}
  runs = {f: [] for f in frameworks}
  for r in range(args.rounds):
    for f in frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]:
      runs[f].append(run_worker(f, {}, args, sys.executable, env))
      print(f"{f}: {runs[f][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
  tps = {f: statistics.median(x['tokens_per_second'] for x in res) for f, res in runs.items()}
  best_peer = {d: max((t for f, t in tps.items() if f.startswith('torch') and d in f), default=None)
               for d in ('fp32', 'bf16')}
  lines = [f'Equal recipe `{os.path.relpath(args.config)}`, median of {args.rounds} alternating rounds of '
           f'{args.steps} steps:', '', '| framework | tokens/s | vs the fastest peer of its precision |', '|---|---:|---:|']
  for f, t in tps.items():
    peer = best_peer['bf16' if 'bf16' in f else 'fp32']
    lines.append(f"| {f} | {t:.0f} | {'' if f.startswith('torch') or not peer else f'{t / peer:.2f}x'} |")
  table = '\n'.join(lines) + '\n'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'recipe_step.json'), 'w') as f:
    json.dump({'machine': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(), 'runs': runs,
               'tokens_per_second': tps, 'args': vars(args)}, f, indent=2)
  with open(os.path.join(args.out, 'recipe_step.md'), 'w') as f:
    f.write(table)
  print(table)


def ablate(args, env: dict, peak: float) -> list[dict]:
  """The default mlm_flax step vs each variant in `args.ablations`, alternating, on the first size at seq 128."""
  size = args.sizes.split(',')[0]
  shape = {**SIZES[size], 'seq': 128, 'batch': args.tokens_per_step // 128}
  variants = [''] + args.ablations.split(';')
  runs = {v: [] for v in variants}
  for r in range(args.ablation_rounds):
    for v in variants[r % len(variants):] + variants[:r % len(variants)]:
      runs[v].append(run_worker('mlm_flax', shape, args, sys.executable, env, tuple(v.split())))
      print(f"ablation {v or 'default'}: {runs[v][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
  tps = {v: statistics.median(r['tokens_per_second'] for r in res) for v, res in runs.items()}
  return [{'size': size, 'variant': v.replace('--override=', '') or 'default', 'tokens_per_second': t,
           'vs_default': t / tps['']} for v, t in tps.items()]


if __name__ == '__main__':
  main()
