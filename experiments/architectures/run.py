"""BERT, BERT with ModernBERT's parts, and a ModernBERT-style model at equal wall-clock time on CPU.

  python experiments/architectures/run.py [--minutes 7] [--root /tmp/architectures] [--arms bert,bert-modern]
  python experiments/architectures/run.py --dry_run    # validate and print each arm's config, train nothing

Four arms, each a config file plus architecture switches (`model.*`, see README "Architecture switches"):
- `bert`: configs/tiny_bert.py (post-LN BERT, the quick start before tiny.py's ModernBERT-style model);
- `bert-preln`: the same with `model.norm_position=pre` only (the control: how much is pre-LN alone);
- `bert-modern`: configs/tiny_bert.py with ModernBERT's parts switched on, on model.type=bert: pre-LN, GeGLU MLP,
  RoPE (no position embeddings), ModernBERT's biases (the decoder's only); LayerNorm, tiny_bert.py's sizes (the
  GeGLU's MLP has 1.5x the MLP FLOPs: the equal wall time charges for them);
- `modernbert`: configs/tiny.py (ModernBERT itself: also its sliding-window layers, depth and widths; the
  quick start since this experiment, named configs/tiny_modern.py in results.json).

All train on the built-in corpus with the same tokenizer (trained once, then passed to every run), batch,
sequence length, masking (40% in training) and seed, in float32, through the command line only
(`python -m mlm_flax.cli train` / `eval`), one run at a time:

1. Timing probe per model: a short run measures its steady tokens/s and its start-up cost (compilation), so
   that `num_train_steps` is set for its learning-rate schedule (warmup, then linear decay to 0) to end at
   about `--minutes` of training, with the configs' warmup fraction (200 of 1400 steps). Each model gets a whole
   schedule that fits the budget, rather than one step count that the faster model finishes and the slower one
   is cut short of.
2. The run, with an eval every `--eval_every` steps. Its clock is `wall_seconds` of metrics.jsonl (from the
   moment `train` has loaded the data and built the model: it includes the train step's compilation) minus
   the time spent in evaluations (the eval row's time minus the train row's at the same step). A run whose
   clock reaches `--minutes` before its last step gets SIGTERM (it saves a checkpoint at the current step and
   exits).
3. `python -m mlm_flax.cli eval` on the final checkpoint: the accuracy at equal wall time. Evaluation masks
   depend only on the seed, the tokenizer and the validation rows (15%, BERT's rate), not on the model; the
   script checks that every evaluation of every run counts the same masked tokens and the same unigram
   baseline.

Writes results.json and accuracy_vs_time.png next to this file (or `--results`); workdirs and caches stay
under `--root`. Each run starts fresh (a rerun deletes the previous workdirs: resuming would break the clock).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_BERT, TINY = os.path.join(REPO, 'configs', 'tiny_bert.py'), os.path.join(REPO, 'configs', 'tiny.py')
MODERN_PARTS = {'model.norm_position': 'pre', 'model.mlp': 'geglu', 'model.positions': 'rope',
                'model.attention_bias': False, 'model.mlp_bias': False, 'model.norm_bias': False,
                'model.classifier_bias': False, 'model.decoder_bias': True}
# Each arm: its config file and the switches set on it (command-line overrides).
RUNS = {'bert': (TINY_BERT, {}), 'bert-preln': (TINY_BERT, {'model.norm_position': 'pre'}),
        'bert-modern': (TINY_BERT, MODERN_PARTS), 'modernbert': (TINY, {})}
LABELS = {'bert': 'BERT (configs/tiny_bert.py)', 'bert-preln': 'BERT pre-LN (tiny_bert.py, norm_position=pre)',
          'bert-modern': "BERT with ModernBERT's parts (tiny_bert.py, switches)",
          'modernbert': 'ModernBERT-style (configs/tiny.py)'}
BATCH, SEQ = 16, 128  # the configs' (checked against config.json)
WARMUP_FRACTION = 200 / 1400  # the configs' warmup_steps / num_train_steps (tiny_bert.py's), kept for any length


def cli(*args: str) -> list[str]:
  return [sys.executable, '-m', 'mlm_flax.cli', *args]


def train_command(name: str, workdir: str, overrides: dict) -> list[str]:
  config, switches = RUNS[name]
  return cli('train', '--config', config, '--workdir', workdir,
             *(f'--config.{k}={v}' for k, v in {**switches, **overrides}.items()))


def arm_config(name: str, overrides: dict):
  """The config `train_command` runs (its file, switches and `overrides` applied), validated as `train` does
  before reading any data; for --dry_run."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from mlm_flax import validation  # pylint: disable=g-import-not-at-top
  path, switches = RUNS[name]
  spec = importlib.util.spec_from_file_location(f'_arm_{name.replace("-", "_")}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**switches, **overrides}.items():
    node, _, leaf = key.rpartition('.')
    (config[node] if node else config)[leaf] = value
  validation.validate_config(config, 1)
  return config


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:  # a row being written
        break
  return rows


def eval_seconds(rows: list[dict]) -> dict[int, float]:
  """Seconds each evaluation took: its row's wall_seconds minus the train row's at the same step."""
  train_at = {r['step']: r['wall_seconds'] for r in rows if r['split'] == 'train'}
  return {r['step']: r['wall_seconds'] - train_at[r['step']] for r in rows
          if r['split'] == 'eval' and r['step'] in train_at}


def curve(rows: list[dict]) -> list[dict]:
  """Eval points with the training clock (wall_seconds minus the evaluations before and including them)."""
  spent, points = eval_seconds(rows), []
  for r in rows:
    if r['split'] == 'eval':
      clock = r['wall_seconds'] - sum(s for step, s in spent.items() if step <= r['step'])
      points.append({'step': r['step'], 'train_seconds': round(clock, 1), 'masked_accuracy': r['masked_accuracy'],
                     'loss': r['loss'], 'num_masked_tokens': r['num_masked_tokens'],
                     'unigram_baseline_accuracy': r.get('unigram_baseline_accuracy')})
  return points


def run(command: list[str], log: str, workdir: str | None = None, limit_s: float | None = None) -> dict:
  """Runs `command` (output to `log`); with `limit_s`, SIGTERMs it once its training clock passes limit_s."""
  start, stopped_at, loads = time.time(), None, []
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(log, 'w') as out:
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    writer_start = None
    while proc.poll() is None:
      time.sleep(1.0)
      loads.append(os.getloadavg()[0])
      if limit_s is None or stopped_at is not None:
        continue
      path = os.path.join(workdir, 'metrics.jsonl')
      mtime = os.path.getmtime(path) if os.path.isfile(path) else None
      rows = read_rows(workdir)
      if rows and writer_start is None and mtime == os.path.getmtime(path):  # no row written meanwhile
        writer_start = mtime - rows[-1]['wall_seconds']  # the metrics writer's start (wall_seconds = 0)
      if writer_start is not None and time.time() - writer_start - sum(eval_seconds(rows).values()) >= limit_s:
        proc.send_signal(signal.SIGTERM)  # train saves a checkpoint at the current step and exits 0
        stopped_at = time.time() - writer_start - sum(eval_seconds(rows).values())
  if proc.returncode:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise SystemExit(f'{" ".join(command)} failed (exit {proc.returncode}):\n{tail}')
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
  return {'seconds': time.time() - start, 'cpu_seconds': cpu, 'stopped_at': stopped_at, 'load_average': loads}


def train_rates(rows: list[dict]) -> list[float]:
  """tokens/s of the train log rows after the first (whose interval includes compilation)."""
  return [r['tokens_per_second'] for r in rows if r['split'] == 'train'][1:]


def probe(name: str, root: str, common: dict, steps: int) -> dict:
  """A short run: steady tokens/s and the start-up cost before the first logged steps run at that rate."""
  workdir = os.path.join(root, f'probe-{name}')
  shutil.rmtree(workdir, ignore_errors=True)
  log_every = steps // 3
  run(train_command(name, workdir, {**common, 'num_train_steps': steps, 'log_every_steps': log_every,
                                    'eval_every_steps': 10 * steps}), os.path.join(root, f'probe-{name}.log'))
  rows = read_rows(workdir)
  rate = statistics.median(train_rates(rows))
  first = next(r for r in rows if r['split'] == 'train')
  startup = first['wall_seconds'] - log_every * BATCH * SEQ / rate
  return {'tokens_per_second': round(rate, 1), 'startup_seconds': round(max(startup, 0.0), 1), 'workdir': workdir}


def cpu_info() -> dict:
  """The CPU's model name and the flags that decide its fast precision (bf16 needs AVX512-BF16 or AMX)."""
  fields = {}
  with open('/proc/cpuinfo') as f:
    for line in f:
      key, _, value = line.partition(':')
      fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get('flags', '').split())
  return {'model_name': fields.get('model name', platform.processor()), 'cores': os.cpu_count(),
          'avx2': 'avx2' in flags, 'avx512_bf16': 'avx512_bf16' in flags, 'amx_bf16': 'amx_bf16' in flags}


def flops_per_token(log: str) -> float | None:
  """The 'X MFLOPs per training token' line that `train` prints."""
  with open(log) as f:
    for line in f:
      if 'MFLOPs per training token' in line:
        return float(line.split()[0]) * 1e6
  return None


def plot(results: dict, minutes: float, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
  for name, r in results['runs'].items():
    points = r['curve'] + [{'train_seconds': r['train_seconds'], 'step': r['steps_done'],
                            'masked_accuracy': r['final_eval']['masked_accuracy']}]
    points = sorted({p['step']: p for p in points}.values(), key=lambda p: p['step'])
    acc = [p['masked_accuracy'] for p in points]
    axes[0].plot([p['train_seconds'] / 60 for p in points], acc, marker='o', ms=3, label=LABELS[name])
    axes[1].plot([p['step'] * BATCH * SEQ / 1e6 for p in points], acc, marker='o', ms=3, label=LABELS[name])
  for ax in axes:
    ax.axhline(results['eval']['unigram_baseline_accuracy'], color='grey', ls=':', lw=1,
               label='unigram baseline (most frequent token)')
  axes[0].axvline(minutes, color='grey', ls='--', lw=1)
  axes[0].set_xlabel('training wall time (minutes, evaluations excluded)')
  axes[1].set_xlabel('training tokens (millions)')
  for ax in axes:
    ax.set_ylabel('eval masked-token accuracy (15% masks)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  cpu = results['machine']['cpu']
  fig.suptitle(f"Equal wall time ({minutes:g} min each, float32, {cpu['cores']}-core {cpu['model_name']}, "
               f"load avg {results['machine']['load_average_during_runs']:.1f})")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--minutes', type=float, default=7.0, help='training wall time of each run')
  parser.add_argument('--root', default='/tmp/architectures', help='workdirs, logs and the data cache')
  parser.add_argument('--results', default=HERE, help='folder for results.json and accuracy_vs_time.png')
  parser.add_argument('--eval_every', type=int, default=None,
                      help='steps between evaluations (default: about 10 per run, for dense curves)')
  parser.add_argument('--probe_steps', type=int, default=60, help='steps of each timing probe')
  parser.add_argument('--margin', type=float, default=0.97,
                      help='fraction of the estimated steps to schedule, so a run ends just inside the budget')
  parser.add_argument('--replot', action='store_true', help='only redraw the plot from --results/results.json')
  parser.add_argument('--arms', default=','.join(RUNS), help=f'comma-separated arms to run, of {", ".join(RUNS)}')
  parser.add_argument('--dry_run', action='store_true', help='validate and print each arm\'s config; train nothing')
  args = parser.parse_args()
  arms = args.arms.split(',')
  unknown = [a for a in arms if a not in RUNS]
  if unknown:
    parser.error(f'--arms: {", ".join(unknown)} not among {", ".join(RUNS)}')
  if args.dry_run:
    common = {'model.dtype': 'float32', 'data.cache_dir': os.path.join(args.root, 'cache')}
    for name in arms:
      config = arm_config(name, common)
      from mlm_flax.models import config as model_config  # pylint: disable=g-import-not-at-top
      print(json.dumps({'arm': name, 'config': os.path.relpath(RUNS[name][0], REPO), 'switches': RUNS[name][1],
                        'resolved': model_config.resolved_switches(config.model.to_dict()),
                        'model': config.model.to_dict()}))
    return
  if args.replot:
    with open(os.path.join(args.results, 'results.json')) as f:
      summary = json.load(f)
    plot(summary, summary['minutes'], os.path.join(args.results, 'accuracy_vs_time.png'))
    return
  started = time.time()
  os.makedirs(args.root, exist_ok=True)
  limit_s = args.minutes * 60
  common = {'model.dtype': 'float32', 'data.cache_dir': os.path.join(args.root, 'cache'), 'progress_bar': False,
            'fill_mask_examples': 0, 'checkpoint_every_steps': 10**9, 'max_checkpoints_to_keep': 1}
  load_before = os.getloadavg()

  # The tokenizer: trained by the first probe, then given to every run, so all see the same token ids.
  probes = {arms[0]: probe(arms[0], args.root, common, args.probe_steps)}
  tok = os.path.join(args.root, 'tokenizer')
  shutil.rmtree(tok, ignore_errors=True)
  shutil.copytree(os.path.join(probes[arms[0]]['workdir'], 'tokenizer'), tok)
  common['data.tokenizer'] = tok
  for name in arms[1:]:
    probes[name] = probe(name, args.root, common, args.probe_steps)
  print('probes:', json.dumps(probes), flush=True)

  results, loads = {}, []
  for name in arms:
    p = probes[name]
    steps = int(args.margin * (limit_s - p['startup_seconds']) * p['tokens_per_second'] / (BATCH * SEQ))
    eval_every = args.eval_every or max(2, round(steps / 20) * 2)
    log_every = eval_every // 2 if eval_every % 2 == 0 else eval_every  # a train row at every eval step
    workdir = os.path.join(args.root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    log = os.path.join(args.root, f'{name}.log')
    print(f'=== {name}: {steps} steps planned ({p["tokens_per_second"]:.0f} tokens/s in the probe) ===', flush=True)
    outcome = run(train_command(name, workdir, {**common, 'num_train_steps': steps, 'log_every_steps': log_every,
                                                'eval_every_steps': eval_every,
                                                'optimizer.warmup_steps': round(WARMUP_FRACTION * steps)}),
                  log, workdir, limit_s)
    loads += outcome['load_average']
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    assert (config['batch_size'], config['max_seq_length']) == (BATCH, SEQ), 'batch or sequence length changed'
    ev = subprocess.run(cli('eval', '--workdir', workdir), capture_output=True, text=True, cwd=REPO, check=True)
    final = json.loads(ev.stdout.strip().splitlines()[-1])
    rows = read_rows(workdir)
    points = curve(rows)
    train_s = outcome['stopped_at']
    if train_s is None:  # finished its schedule: the clock at its last train row
      last = max((r for r in rows if r['split'] == 'train'), key=lambda r: r['step'])
      train_s = last['wall_seconds'] - sum(s for step, s in eval_seconds(rows).items() if step < last['step'])
    rates = train_rates(rows)
    results[name] = {
        'config': os.path.relpath(RUNS[name][0], REPO), 'switches': RUNS[name][1], 'steps_planned': steps,
        'steps_done': final['step'],
        'stopped_by': 'time limit (SIGTERM)' if outcome['stopped_at'] is not None else 'end of schedule',
        'train_seconds': round(train_s, 1), 'tokens': final['step'] * BATCH * SEQ,
        'tokens_per_second_median': round(statistics.median(rates), 1),
        'flops_per_token': flops_per_token(log), 'mfu_median': round(statistics.median(
            r['mfu'] for r in rows if r['split'] == 'train'), 3),
        'learning_rate': config['optimizer']['learning_rate'], 'warmup_steps': config['optimizer']['warmup_steps'],
        'model': {k: config['model'].get(k) for k in ('type', 'num_layers', 'hidden_size', 'num_heads',
                                                      'intermediate_size', 'vocab_size', 'mlp', 'norm', 'positions',
                                                      'norm_position')},
        'probe': {k: v for k, v in p.items() if k != 'workdir'},
        'final_eval': final, 'curve': points, 'total_seconds': round(outcome['seconds'], 1),
        'process_cpu_seconds': round(outcome['cpu_seconds'], 1),  # the whole train command, evals included
        'load_average_during_run': round(statistics.mean(outcome['load_average']), 2)}
    print(name, json.dumps({k: v for k, v in results[name].items() if k != 'curve'}), flush=True)

  # Same evaluation masks: every eval of every run counts the same masked tokens and unigram baseline.
  counts = {p['num_masked_tokens'] for r in results.values() for p in r['curve']}
  counts |= {r['final_eval']['num_masked_tokens'] for r in results.values()}
  baselines = {p['unigram_baseline_accuracy'] for r in results.values() for p in r['curve']}
  if len(counts) != 1 or len(baselines) != 1:
    raise SystemExit(f'evaluation masks differ between the runs: masked tokens {counts}, baselines {baselines}')

  summary = {
      'minutes': args.minutes, 'runs': results,
      'eval': {'num_masked_tokens': counts.pop(), 'unigram_baseline_accuracy': baselines.pop(), 'rate': 0.15},
      'machine': {'cpu': cpu_info(), 'load_average_before': [round(x, 2) for x in load_before],
                  'load_average_during_runs': round(statistics.mean(loads), 2) if loads else None,
                  'load_average_max': round(max(loads), 2) if loads else None},
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
      'total_wall_seconds': round(time.time() - started, 1),
  }
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  plot(summary, args.minutes, os.path.join(args.results, 'accuracy_vs_time.png'))
  print(json.dumps({n: (r['final_eval']['masked_accuracy'], r['steps_done'], r['train_seconds'])
                    for n, r in results.items()}))


if __name__ == '__main__':
  main()
