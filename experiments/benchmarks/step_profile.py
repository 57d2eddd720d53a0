"""Per-op profile of one training step, ours and the equal-recipe PyTorch peer's: where the time goes, by op class.

    python experiments/benchmarks/step_profile.py                         # the quick start's recipe, bf16 + f32
    python experiments/benchmarks/step_profile.py --size base --dtypes bfloat16

JAX: the step (`train.jit_train_step`, synthetic batch on the device) runs `--steps` times under
`jax.profiler.trace`; each XLA:CPU op (thunk) of the trace is matched to its HLO instruction, whose `op_name`
(the JAX call path) and shape give its class. PyTorch: `ModernBertForMaskedLM` (workers/torch_modernbert_step.py's
model, eager attention, the fastest variant without compile; `--torch_compile` profiles the compiled one) under
`torch.profiler`, self CPU time of each aten op, classed by name. Matmul GFLOP/s counts the model FLOPs the
matmuls do (`mlm_flax.flops`; the peer's head at every position). Writes results/step_profile_<size>.{json,md}.
Timings need a quiet machine; compare the shares, and ratios within one run. XLA runs independent ops at
once on its threads, so the classes' sums overlap: for ours the table also gives how much of the step some op,
and some custom call (the oneDNN and CPU kernels, which take turns), covers.
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.join(HERE, 'workers')]

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import recipe  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ('matmul: dense + head', 'matmul: attention', 'attention kernel (products, softmax, RoPE, layout)',
           'attention softmax + masks', 'RoPE + head layout',
           'norms', 'MLP activation (GeGLU)', 'embedding + gathers', 'loss', 'masking', 'dtype converts',
           'optimizer update + guard', 'other')
BASE = dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=1152)  # ModernBERT-base's shape


def config_for(size: str):
  c = recipe.load(None)
  if size == 'base':  # the same recipe at ModernBERT-base's width and depth, vocabulary 30,522
    c.model.update(BASE, vocab_size=30522, global_attn_every_n_layers=3, local_attention=64)
    c.batch_size = 32
  return c


def machine_line() -> str:
  """'2-core AMD EPYC, avx512_bf16=True, amx_bf16=False': the CPU every figure is tied to."""
  import platform  # pylint: disable=g-import-not-at-top
  cpu = open('/proc/cpuinfo').read()
  model = re.search(r'model name\s*:\s*(.*)', cpu)
  return (f"{os.cpu_count()}-core {model.group(1) if model else platform.processor()}, "
          f"avx512_bf16={'avx512_bf16' in cpu}, amx_bf16={'amx_bf16' in cpu}")


def jax_class(op_name: str, shape: str, opcode: str, target: str = '') -> str:
  """The class of an XLA op from its JAX call path (`op_name`), output shape, opcode and custom-call target."""
  dims = [int(d) for d in re.findall(r'\d+', shape.split('[', 1)[-1].split(']')[0])]  # not the 32 of 'f32'
  square = len(dims) >= 2 and dims[-1] == dims[-2]
  if 'attention' in target:  # `mlm_flax/kernels/onednn_attention.cc`: the whole attention, each way
    return 'attention kernel (products, softmax, RoPE, layout)'
  if 'norm' in target:  # `cpu_norm.cc`
    return 'norms'
  if 'glu' in target:  # `cpu_glu.cc`: GeGLU's activation, each way
    return 'MLP activation (GeGLU)'
  if 'xent' in target:  # `cpu_xent.cc`: the loss and the accuracy metric's argmax, each way
    return 'loss'
  if opcode == 'custom-call':  # oneDNN's matmuls (`mlm_flax/kernels`): batched 3-D in attention, 2-D elsewhere
    return 'matmul: attention' if len(dims) == 3 else 'matmul: dense + head'
  if 'convert_element_type' in op_name and 'dot_general' not in op_name:
    return 'dtype converts'
  if 'dot_general' in op_name or opcode == 'dot':
    return 'matmul: attention' if re.search(r'bh[qk]|\bn[qk][dkq],', op_name) else 'matmul: dense + head'
  if 'mask_tokens' in op_name or re.search(r'random|threefry|argsort|_uniform|_randint', op_name):
    return 'masking'
  if re.search(r'(^|/)(transpose\()?jvp\(\)/', op_name):  # outside the model, under the gradient: loss, metrics
    return 'loss'
  if 'norm' in op_name:
    return 'norms'
  if 'log_softmax' in op_name or 'take_along_axis' in op_name and 'Bert' not in op_name:
    return 'loss'
  if 'take' in op_name or 'gather' in op_name or 'embed' in op_name.lower() or 'top_k' in op_name:
    return 'embedding + gathers'
  if 'Bert' in op_name and re.search(r'/layer_\d+/', op_name):
    if square:
      return 'attention softmax + masks'
    if 'erf' in op_name or 'gelu' in op_name or 'intermediate' in op_name or 'split' in op_name and len(dims) == 3:
      return 'MLP activation (GeGLU)'
    if len(dims) == 4:
      return 'RoPE + head layout'
  if 'Bert' not in op_name and op_name:
    return 'optimizer update + guard'
  return 'other'


def build_jax_step(c, dtype: str):
  """Our jitted training step of config `c` in `dtype`, its state after 3 steps, and its synthetic batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mlm_flax import parallel, train
  from mlm_flax.models import make_model
  from mlm_flax.objectives import masking
  c.model.dtype = dtype
  model, mesh = make_model(c.model), parallel.make_mesh()
  tx = train.make_optimizer(c.optimizer, c.num_train_steps)
  mask_fn = functools.partial(masking.mask_tokens, vocab_size=c.model.vocab_size, mask_id=common.MASK_ID,
                              special_ids=common.SPECIALS, pad_id=0, rate=c.masking.rate)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=c.max_seq_length),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  step = train.jit_train_step(model, tx, mask_fn, masking.max_predictions(c.max_seq_length, c.masking.rate), mesh)
  args = argparse.Namespace(batch=c.batch_size, seq=c.max_seq_length, vocab=c.model.vocab_size)
  ones = np.ones((args.batch, args.seq), np.int32)
  batch = parallel.to_global({'input_ids': common.token_ids(args, 0), 'segment_ids': ones,
                              'positions': np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape)}, mesh)
  for _ in range(3):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  return step, state, batch


def time_jax_step(step, state, batch, steps: int):
  """Seconds per step as the training loop runs it, and the state after."""
  import jax  # pylint: disable=g-import-not-at-top
  from mlm_flax import parallel  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
    if not parallel.steps_queued():  # as the training loop does on CPU
      jax.block_until_ready(metrics)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


def profile_jax(c, dtype: str, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  step, state, batch = build_jax_step(c, dtype)
  info = {}
  for line in step.lower(state, batch).compile().as_text().splitlines():
    # opcodes: 'fusion', 'custom-call', ...; a tuple-shaped output, '(f32[..], f32[..])', is one token with spaces
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(', line)
    if m:
      o = re.search(r'op_name="([^"]*)"', line)
      t = re.search(r'custom_call_target="([^"]*)"', line)
      info[m.group(1)] = (m.group(2), m.group(3), o.group(1) if o else '', t.group(1) if t else '')
  step_s, state = time_jax_step(step, state, batch, steps)
  folder = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
    events = json.load(gzip.open(glob.glob(f'{folder}/**/*.trace.json.gz', recursive=True)[0]))['traceEvents']
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  ms, spans = collections.Counter(), collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and e['name'] in info:
      spans[info[e['name']][1] == 'custom-call'].append((e['ts'], e['ts'] + e['dur']))
      shape, opcode, op_name, target = info[e['name']]
      ms[jax_class(op_name, shape, opcode, target)] += e['dur'] / 1000 / steps
  ops = spans[True] + spans[False]
  cover = {'span': (max(t for _, t in ops) - min(s for s, _ in ops)) / 1000 / steps,
           'custom calls': _union(spans[True]) / 1000 / steps, 'any op': _union(ops) / 1000 / steps}
  return {'step_ms': step_s * 1000, 'ms': dict(ms), 'ops': len(ops) // steps, 'cover_ms': cover}


def _union(intervals: list) -> float:
  """The length of the union of (start, end) intervals: time covered by at least one of them."""
  total, end = 0.0, float('-inf')
  for s, t in sorted(intervals):
    total += max(0.0, t - max(s, end))
    end = max(end, t)
  return total


def torch_class(name: str) -> str:
  n = name.lower()
  table = [(('aten::mm', 'aten::addmm', 'aten::linear', 'mkldnn', 'onednn'), 'matmul: dense + head'),
           (('aten::bmm', 'aten::baddbmm', 'matmul'), 'matmul: attention'),
           (('softmax', 'masked_fill', 'aten::where', 'sdpa', 'attention'), 'attention softmax + masks'),
           (('rotary', 'aten::cat', 'aten::neg', 'aten::cos', 'aten::sin', 'aten::transpose', 'aten::view',
             'aten::reshape', 'aten::permute', 'aten::clone', 'aten::contiguous', 'aten::copy_'), 'RoPE + head layout'),
           (('layer_norm',), 'norms'), (('gelu', 'aten::chunk', 'aten::mul'), 'MLP activation (GeGLU)'),
           (('embedding', 'index', 'gather'), 'embedding + gathers'),
           (('cross_entropy', 'nll_loss', 'log_softmax'), 'loss'), (('aten::to', '_to_copy'), 'dtype converts'),
           (('adam', 'optimizer', '_foreach', 'clip_grad', 'norm', 'zero_grad'), 'optimizer update + guard')]
  for keys, cls in table:
    if any(k in n for k in keys):
      return cls
  return 'other'


def build_torch_step(c, dtype: str, compiled: bool):
  """The eager-attention peer's training step of config `c` (`dtype`: bf16 autocast or f32), warmed up."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch
  import torch_modernbert_step as peer
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  model = peer.build(c, sparse=False, attn='eager')
  forward = torch.compile(model) if compiled else model
  opt = torch.optim.AdamW(model.parameters(), lr=c.optimizer.learning_rate, betas=(c.optimizer.b1, c.optimizer.b2),
                          eps=c.optimizer.eps, weight_decay=c.optimizer.weight_decay)
  args = argparse.Namespace(batch=c.batch_size, seq=c.max_seq_length, vocab=c.model.vocab_size, mask_rate=c.masking.rate)
  inputs, labels = (torch.from_numpy(x).long() for x in common.bert_mask(args, common.token_ids(args, 0), 0))
  autocast = torch.autocast('cpu', dtype=torch.bfloat16) if dtype == 'bfloat16' else contextlib.nullcontext()

  def run():
    with autocast:
      loss = forward(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.optimizer.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(5):
    run()
  return run


def time_torch_step(run, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    run()
  return (time.perf_counter() - start) / steps


def profile_torch(c, dtype: str, steps: int, compiled: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  run = build_torch_step(c, dtype, compiled)
  step_s = time_torch_step(run, steps)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      run()
  ms = collections.Counter()
  for e in prof.key_averages():
    ms[torch_class(e.key)] += e.self_cpu_time_total / 1000 / steps
  return {'step_ms': step_s * 1000, 'ms': dict(ms)}


def table(results: dict, flops: dict) -> str:
  names = list(results)
  lines = ['| op class | ' + ' | '.join(f'{n} ms (share)' for n in names) + ' |',
           '|---|' + '---:|' * len(names)]
  for cls in CLASSES:
    cells = []
    for n in names:
      r = results[n]
      total = sum(r['ms'].values())
      v = r['ms'].get(cls, 0.0)
      cell = f'{v:.1f} ({v / total:.0%})' if total else '-'
      if cls.startswith('matmul') and v:
        key = 'attention' if 'attention' in cls else 'dense'
        cell += f", {flops[n][key] / (v / 1000) / 1e9:.0f} GFLOP/s"
      cells.append(cell)
    lines.append(f'| {cls} | ' + ' | '.join(cells) + ' |')
  lines.append('| **step (timed without the profiler)** | ' + ' | '.join(f"**{results[n]['step_ms']:.1f}**"
                                                                           for n in names) + ' |')
  covered = [n for n in names if 'cover_ms' in results[n]]
  for n in covered:  # XLA runs independent ops at once: the classes' sums overlap
    c = results[n]['cover_ms']
    lines.append(f"\n{n}, profiled: {c['span']:.1f} ms per step from its first op to its last; some op runs in "
                 f"{c['any op']:.1f} of them, a custom call (oneDNN matmuls and the CPU kernels, their waits for "
                 f"their turn included) in {c['custom calls']:.1f}.")
  return '\n'.join(lines)


def matmul_flops(c, head_everywhere: bool) -> dict:
  """FLOPs of one step's matmuls as both sides run them: dense + head, and attention (full score matrices:
  neither side skips the masked-out part of a sliding window)."""
  from mlm_flax import flops  # pylint: disable=g-import-not-at-top
  m, s, tokens = c.model, c.max_seq_length, c.batch_size * c.max_seq_length
  attention = 6 * 2 * m.hidden_size * s * m.num_layers * tokens
  rate = 1.0 if head_everywhere else c.masking.rate
  total = flops.train_flops_per_token(m.num_layers, m.hidden_size, m.intermediate_size, m.vocab_size, s, rate,
                                      glu=True) * tokens
  return {'dense': total - attention, 'attention': attention}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='quick_start', choices=('quick_start', 'base'))
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--torch_compile', action='store_true')
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  parser.add_argument('--_one', help=argparse.SUPPRESS)  # 'mlm_flax:DTYPE' or 'torch:DTYPE', in a subprocess
  args = parser.parse_args()
  if args._one:  # pylint: disable=protected-access
    framework, dtype = args._one.split(':')  # pylint: disable=protected-access
    c = config_for(args.size)
    result = (profile_jax(c, dtype, args.steps) if framework == 'mlm_flax'
              else profile_torch(c, dtype, args.steps, args.torch_compile))
    print('RESULT ' + json.dumps(result))
    return
  results, flops = {}, {}
  for dtype in args.dtypes.split(','):
    # Each profile in its own process: at base size the JAX trace and torch's profiler together outgrow 24 GB.
    for framework in ('mlm_flax', 'torch'):
      name = f"{framework} {dtype}{' compiled' if framework == 'torch' and args.torch_compile else ''}"
      cmd = [sys.executable, os.path.abspath(__file__), '--size', args.size, '--steps', str(args.steps),
             '--_one', f'{framework}:{dtype}'] + (['--torch_compile'] if args.torch_compile else [])
      # torch under OpenMP's default wait policy, its faster one on a quiet machine (train_step.PASSIVE).
      out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                           env=train_step.torch_env(dict(os.environ))).stdout
      results[name] = json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[len('RESULT '):])
      flops[name] = matmul_flops(config_for(args.size), framework == 'torch')
  machine = machine_line()
  md = f'Step profile, {args.size} ({machine}):\n\n' + table(results, flops) + '\n'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'step_profile_{args.size}.json'), 'w') as f:
    json.dump({'machine': machine, 'results': results, 'matmul_flops': flops, 'args': vars(args)}, f, indent=2)
  with open(os.path.join(args.out, f'step_profile_{args.size}.md'), 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
