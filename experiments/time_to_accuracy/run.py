"""Time to accuracy on one CPU machine: the quick start against Hugging Face's PyTorch MLM recipe, one run.

  python experiments/time_to_accuracy/run.py [--budget_minutes 10] [--peer_lrs 1e-4,3e-4,1e-3]
      [--arms ours,ours-15,ours-rate-schedule,ours-seq-warmup,ours-batch-warmup,ours-bert]
      [--root /tmp/time_to_accuracy] [--no_peer --results DIR]

Both sides: the built-in corpus (`builtin:stdlib_docs`), the quick start's WordPiece tokenizer (2,048; trained
once by the first probe and given to every run, the peer included), batch 16 x 128 tokens, about the same
training FLOPs per token (the peer: `configs/tiny_bert.py`'s BERT, 2 layers, hidden 256, 4 heads, MLP 1024, no
dropout; ours: `configs/tiny.py`'s 3-layer ModernBERT-style model, +5%), the same wall-clock budget each, one
run at a time with every core.

Peer (`--_peer`, a subprocess): `BertForMaskedLM` trained as `run_mlm.py` users do: `datasets.map` tokenization
with special tokens, `group_texts` into rows of 128, `DataCollatorForLanguageModeling` at 15%, `Trainer` (AdamW,
linear warmup over 1/7 of the steps as ours, then linear decay to 0), `torch.set_num_threads(cores)`, f32, or
bf16 autocast when the CPU has AVX512-BF16 or AMX. Its learning rate is tuned: each of `--peer_lrs` trains for
`--sweep_fraction` of the budget, and the best final accuracy's rate trains for the whole budget. A short
timing probe first sets `max_steps` so that the decay ends at the budget. The final run saves a checkpoint every
`--peer_save_seconds` of training (saving time excluded from its clock).

Ours: `configs/tiny.py` (the quick start) through `python -m mlm_flax.cli train`, one run per arm (`ARMS`: the
ablations undo one choice each; `ours-bert` runs `configs/tiny_bert.py` instead), each with a timing probe (one
per config) that sets `num_train_steps` to end at the budget, evaluated every ~1/10 of its steps, SIGTERMed if
its clock (evaluation time excluded) passes the budget: the approach of experiments/architectures/run.py, whose
helpers are reused.

Evaluation, the same for both: every peer checkpoint goes through `mlm-flax import`; its config.json then gets
the race's evaluation settings (sequence length 128, seed, data, 15% masks: what `mlm-flax import` cannot
know), and `mlm-flax eval` scores it. Masks depend only on the seed, the tokenizer and the validation rows, so
both sides are scored on identical fixed 15% masks; the script checks every evaluation counts the same masked
tokens. Writes results.json, results.md and accuracy_vs_time.png into `--results` (default: this folder).
`--no_peer` runs only our arms (the ablation table; no target, no speed-ups): give it its own `--results`.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location('architectures_run', os.path.join(REPO, 'experiments', 'architectures',
                                                                                'run.py'))
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)

CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
BATCH, SEQ = 16, 128  # configs/tiny.py's
WARMUP_FRACTION = 1 / 7  # tiny.py's warmup_steps / num_train_steps (157 / 1100), for every run of any length
# Arms of ours: overrides of configs/tiny.py. Warm-up phases are fractions of the planned steps ({a}, {b}).
ARMS = {
    'ours': {},  # the quick start: 40% training masks, 15% eval
    'ours-15': {'masking.rate': 0.15},  # BERT's rate in training too
    'ours-rate-schedule': {'masking.rate': 0.4, 'masking.rate_schedule': 'linear', 'masking.final_rate': 0.15},
    'ours-seq-warmup': {'seq_len_warmup': '32:{a},64:{b}'},  # 10% of the steps at 32 tokens, 10% at 64
    'ours-batch-warmup': {'batch_size_warmup': '4:{a},8:{b}'},  # 10% at 4 sequences, 10% at 8
    'ours-bert': {},  # configs/tiny_bert.py (ARM_CONFIGS): the BERT of the peer, ~the same FLOPs per token
}
ARM_CONFIGS = {'ours-bert': os.path.join(REPO, 'configs', 'tiny_bert.py')}  # arms not on configs/tiny.py
LABELS = {'ours': 'ours: quick start (tiny.py)', 'ours-15': 'ours, 15% masks',
          'ours-rate-schedule': 'ours, masks 40% -> 15% (linear)', 'ours-seq-warmup': 'ours, seq. length 32/64 warm-up',
          'ours-batch-warmup': 'ours, batch 4/8 warm-up', 'ours-bert': 'ours, BERT (tiny_bert.py)',
          'peer': 'HF Trainer + BertForMaskedLM (PyTorch)', 'peer-modernbert': 'HF Trainer + ModernBertForMaskedLM (PyTorch)'}


def data_overrides(args) -> dict:
  """Config overrides that choose the corpus and its cache: the same for ours, the peer and every eval."""
  out = {'data.cache_dir': os.path.join(args.root, 'cache')}
  if args.train_files:
    out.update({'data.dataset': '', 'data.train_files': args.train_files})
    if args.validation_files:
      out['data.validation_files'] = args.validation_files
  return out


# --- the peer: Hugging Face's PyTorch recipe -----------------------------------------------------------------

def peer_main(args) -> None:
  """One peer run (in its own process): probe, then Trainer for `--budget_s` of training; writes peer.json."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from mlm_flax import data  # pylint: disable=g-import-not-at-top
  from mlm_flax.configs import tiny, tiny_bert  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  cpu = arch.cpu_info()
  bf16 = cpu['avx512_bf16'] or cpu['amx_bf16']  # autocast is slower than f32 without them
  config = (tiny if args.peer == 'modernbert' else tiny_bert).get_config()  # the peer's model; data as tiny.py's
  config.data.update({k[5:]: v for k, v in data_overrides(args).items()})
  texts = data.load_text_splits(config.data, config.seed)['train']
  tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)

  def tokenize(batch):  # run_mlm.py: special tokens per document, then group_texts
    return tok(batch['text'], return_special_tokens_mask=True)

  def group_texts(batch):
    joined = {k: sum(batch[k], []) for k in batch}
    total = len(joined['input_ids']) // SEQ * SEQ
    return {k: [v[i:i + SEQ] for i in range(0, total, SEQ)] for k, v in joined.items()}

  rows = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc='peer tokenize')
  rows = rows.map(group_texts, batched=True, desc='peer group_texts')
  m = config.model
  if args.peer == 'modernbert':  # the equal recipe: configs/tiny.py's model, masks, optimizer
    make_model = lambda: transformers.ModernBertForMaskedLM(modernbert_config(config, tok))
    mlm_probability, opt = config.masking.rate, config.optimizer
    optimizer_args = dict(adam_beta1=opt.b1, adam_beta2=opt.b2, adam_epsilon=opt.eps, weight_decay=opt.weight_decay,
                          max_grad_norm=opt.grad_clip_norm, torch_compile=args.peer_compile)
  else:
    bert = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size, hidden_dropout_prob=m.hidden_dropout,
        attention_probs_dropout_prob=m.attention_dropout, max_position_embeddings=m.max_position_embeddings,
        pad_token_id=tok.pad_token_id)
    make_model, mlm_probability, optimizer_args = lambda: transformers.BertForMaskedLM(bert), 0.15, {'weight_decay': 0.01}
  collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability)

  def trainer(max_steps, callbacks=()):
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, 'trainer'), per_device_train_batch_size=BATCH, learning_rate=args.lr,
        lr_scheduler_type='linear', warmup_steps=round(WARMUP_FRACTION * max_steps), max_steps=max_steps,
        logging_steps=10**9, save_strategy='no', report_to=[], seed=0, bf16=bf16,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **optimizer_args)
    return transformers.Trainer(model=make_model(), args=targs, train_dataset=rows,
                                data_collator=collator, callbacks=list(callbacks))

  class Clock(transformers.TrainerCallback):
    """Training seconds (saving excluded); saves every `save_s` and stops at the budget."""

    def __init__(self, budget_s, save_s, save=True):
      self.budget_s, self.save_s, self.saved, self.start, self.paused = budget_s, save_s, [], None, 0.0
      self.save_at_end, self.step_ends = save, []

    def seconds(self):
      return time.time() - self.start - self.paused

    def on_train_begin(self, targs, state, control, **kw):
      self.start = time.time()

    def save(self, step, model):
      t0, seconds = time.time(), self.seconds()
      path = os.path.join(args.out, f'ckpt-{step:06d}')
      model.save_pretrained(path)
      tok.save_pretrained(path)
      self.saved.append({'step': step, 'train_seconds': round(seconds, 1), 'path': path})
      self.paused += time.time() - t0

    def on_step_end(self, targs, state, control, model=None, **kw):
      seconds = self.seconds()
      self.step_ends.append(seconds)
      if seconds >= self.budget_s or state.global_step >= state.max_steps:
        control.should_training_stop = True
        if self.save_at_end:
          self.save(state.global_step, model)
      elif self.save_s and seconds >= self.save_s * (len(self.saved) + 1):
        self.save(state.global_step, model)

  probe_steps = args.probe_steps
  clock = Clock(10**9, 0, save=False)
  trainer(probe_steps, [clock]).train()
  ends = clock.step_ends
  rate = (len(ends) - 1) / (ends[-1] - ends[0])  # steady steps/s (after the first step's start-up)
  startup = max(ends[0] - 1 / rate, 0.0)
  max_steps = max(10, int(args.margin * (args.budget_s - startup) * rate))
  clock = Clock(args.budget_s, args.save_seconds)
  trainer(max_steps, [clock]).train()
  result = {'learning_rate': args.lr, 'bf16_autocast': bool(bf16), 'probe_steps_per_second': round(rate, 3),
            'probe_startup_seconds': round(startup, 2),
            'max_steps': max_steps, 'checkpoints': clock.saved, 'torch_threads': torch.get_num_threads(),
            'train_rows': len(rows), 'torch': torch.__version__, 'transformers': transformers.__version__}
  with open(os.path.join(args.out, 'peer.json'), 'w') as f:
    json.dump(result, f, indent=2)


def modernbert_config(config, tok):
  """transformers' `ModernBertConfig` of `config.model` (through our exporter's mapping: no copied numbers), with
  eager attention: on CPU it trains ~2x faster than SDPA at these shapes (experiments/benchmarks/README.md)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import modernbert as interop  # pylint: disable=g-import-not-at-top
  model = {**config.model.to_dict(), 'vocab_size': len(tok), 'pad_token_id': tok.pad_token_id}
  hf = interop.hf_config_from_model(model, tok)
  hf.pop('architectures')
  return transformers.ModernBertConfig(**hf, attn_implementation='eager')


def peer_run(args, lr: float, budget_s: float, save_seconds: float, name: str) -> dict:
  out = os.path.join(args.root, name)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  command = [sys.executable, os.path.abspath(__file__), '--_peer', '--lr', str(lr), '--budget_s', str(budget_s),
             '--save_seconds', str(save_seconds), '--out', out, '--tokenizer', os.path.join(args.root, 'tokenizer'),
             '--root', args.root, '--probe_steps', str(args.peer_probe_steps), '--margin', str(args.margin),
             '--peer', args.peer] + (['--peer_compile'] if args.peer_compile else [])
  if args.train_files:
    command += ['--train_files', args.train_files] + (['--validation_files', args.validation_files]
                                                     if args.validation_files else [])
  outcome = arch.run(command, os.path.join(args.root, f'{name}.log'))
  with open(os.path.join(out, 'peer.json')) as f:
    result = json.load(f)
  result['load_average'] = round(statistics.mean(outcome['load_average']), 2) if outcome['load_average'] else None
  return result


def eval_hf(args, ckpt: str, ours_config: dict) -> dict:
  """`mlm-flax import` then `mlm-flax eval` of a peer checkpoint, with the race's evaluation settings."""
  workdir = ckpt + '-workdir'
  shutil.rmtree(workdir, ignore_errors=True)
  subprocess.run(arch.cli('import', '--hf', ckpt, '--workdir', workdir), check=True, cwd=REPO,
                 capture_output=True, text=True)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  for key in ('seed', 'max_seq_length', 'eval_batch_size', 'data'):
    config[key] = ours_config[key]
  config['data']['tokenizer'] = None  # the workdir's (the same vocabulary)
  config['masking'] = ours_config['masking']  # eval_rate 0.15
  with open(path, 'w') as f:
    json.dump(config, f, indent=2)
  ev = subprocess.run(arch.cli('eval', '--workdir', workdir), check=True, cwd=REPO, capture_output=True, text=True)
  return json.loads(ev.stdout.strip().splitlines()[-1])


# --- ours ------------------------------------------------------------------------------------------------------

def ours_command(workdir: str, overrides: dict, config: str = CONFIG) -> list[str]:
  return arch.cli('train', '--config', config, '--workdir', workdir, *(f'--config.{k}={v}' for k, v in overrides.items()))


def ours_probe(args, common: dict, config: str = CONFIG, name: str = 'probe-ours') -> dict:
  """Steady tokens/s and start-up seconds of `config` (each config of an arm is probed on its own)."""
  workdir = os.path.join(args.root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  steps = args.probe_steps
  log_every = max(steps // 3, 1)
  arch.run(ours_command(workdir, {**common, 'num_train_steps': steps, 'log_every_steps': log_every,
                                  'eval_every_steps': 10 * steps}, config), os.path.join(args.root, f'{name}.log'))
  rows = arch.read_rows(workdir)
  rate = statistics.median(arch.train_rates(rows) or [r['tokens_per_second'] for r in rows if r['split'] == 'train'])
  first = next(r for r in rows if r['split'] == 'train')
  startup = max(first['wall_seconds'] - log_every * BATCH * SEQ / rate, 0.0)
  return {'tokens_per_second': round(rate, 1), 'startup_seconds': round(startup, 1), 'workdir': workdir}


def ours_arm(args, name: str, common: dict, probe: dict, limit_s: float) -> dict:
  steps = int(args.margin * (limit_s - probe['startup_seconds']) * probe['tokens_per_second'] / (BATCH * SEQ))
  steps = max(steps, 10)
  a, b = max(1, steps // 10), max(1, steps // 10)
  overrides = {k: v.format(a=a, b=b) if isinstance(v, str) else v for k, v in ARMS[name].items()}
  for key, full in (('seq_len_warmup', SEQ), ('batch_size_warmup', BATCH)):  # warm-up steps are cheaper
    if key in overrides:
      phases = [tuple(map(int, p.split(':'))) for p in overrides[key].split(',')]
      steps += int(sum(n * (1 - v / full) for v, n in phases))
      overrides[key] = ','.join(f'{v}:{n}' for v, n in phases)
  eval_every = max(2, round(steps / 20) * 2)
  workdir = os.path.join(args.root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  overrides = {**common, **overrides, 'num_train_steps': steps, 'log_every_steps': eval_every // 2,
               'eval_every_steps': eval_every, 'optimizer.warmup_steps': round(WARMUP_FRACTION * steps)}
  print(f'=== {name}: {steps} steps planned ===', flush=True)
  outcome = arch.run(ours_command(workdir, overrides, ARM_CONFIGS.get(name, CONFIG)),
                     os.path.join(args.root, f'{name}.log'), workdir, limit_s)
  ev = subprocess.run(arch.cli('eval', '--workdir', workdir), capture_output=True, text=True, cwd=REPO, check=True)
  final = json.loads(ev.stdout.strip().splitlines()[-1])
  rows = arch.read_rows(workdir)
  train_s = outcome['stopped_at']
  if train_s is None:
    last = max((r for r in rows if r['split'] == 'train'), key=lambda r: r['step'])
    train_s = last['wall_seconds'] - sum(s for step, s in arch.eval_seconds(rows).items() if step < last['step'])
  points = [p for p in arch.curve(rows) if p['step'] < final['step']]
  points.append({'step': final['step'], 'train_seconds': round(train_s, 1),
                 'masked_accuracy': final['masked_accuracy'], 'num_masked_tokens': final['num_masked_tokens']})
  return {'overrides': {k: v for k, v in overrides.items() if k not in common}, 'steps_planned': steps,
          'steps_done': final['step'], 'train_seconds': round(train_s, 1), 'final_eval': final, 'curve': points,
          'stopped_by': 'time limit (SIGTERM)' if outcome['stopped_at'] is not None else 'end of schedule',
          'load_average': round(statistics.mean(outcome['load_average']), 2) if outcome['load_average'] else None}


# --- the race ----------------------------------------------------------------------------------------------------

def label(name: str, summary: dict) -> str:
  """The legend / table name of a run (the peer's names its model)."""
  if name == 'peer' and summary.get('peer_model', '').startswith('ModernBert'):
    name = 'peer-modernbert'
  return LABELS.get(name, name)


def time_to(points: list[dict], target: float) -> float | None:
  """Training seconds at which the curve first reaches `target`, interpolated linearly between evaluations."""
  prev = None
  for p in points:
    if p['masked_accuracy'] >= target:
      if prev is None or p['masked_accuracy'] == prev['masked_accuracy']:
        return p['train_seconds']
      f = (target - prev['masked_accuracy']) / (p['masked_accuracy'] - prev['masked_accuracy'])
      return round(prev['train_seconds'] + f * (p['train_seconds'] - prev['train_seconds']), 1)
    prev = p
  return None


def plot(summary: dict, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.8))
  for name, r in summary['runs'].items():
    ax.plot([p['train_seconds'] / 60 for p in r['curve']], [p['masked_accuracy'] for p in r['curve']],
            marker='o', ms=3, lw=2.2 if name == 'peer' else 1.4, color='black' if name == 'peer' else None,
            label=label(name, summary))
  if summary['peer_final_accuracy'] is not None:
    ax.axhline(summary['peer_final_accuracy'], color='grey', ls='--', lw=1, label="peer's final accuracy")
  ax.axvline(summary['budget_minutes'], color='grey', ls=':', lw=1)
  ax.set_xlabel('training wall time (minutes; evaluations and checkpoint saves excluded)')
  ax.set_ylabel('eval masked-token accuracy (fixed 15% masks)')
  cpu = summary['machine']['cpu']
  ax.set_title(f"{summary['budget_minutes']:g} min each, {cpu['cores']}-core {cpu['model_name']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def markdown(summary: dict) -> str:
  if summary['peer'] is None:  # --no_peer: the ablation table
    base = summary['runs'].get('ours', {}).get('final_eval', {}).get('masked_accuracy')
    lines = [f"# Ablations of the quick start ({summary['budget_minutes']:g} min each, no peer)", '',
             f"Eval: {summary['eval']['num_masked_tokens']} masked tokens, the same masks for every run.", '',
             '| arm | masked acc. at budget | vs the quick start | steps | stopped by |', '|---|---:|---:|---:|---|']
    for name, r in summary['runs'].items():
      acc = r['final_eval']['masked_accuracy']
      delta = '-' if base is None or name == 'ours' else f'{acc - base:+.4f}'
      lines.append(f"| {label(name, summary)} | {acc:.4f} | {delta} | {r['steps_done']} | {r['stopped_by']} |")
    return '\n'.join(lines + machine_lines(summary))
  lines = [f"# Time to accuracy ({summary['budget_minutes']:g} min each)", '',
           f"Peer: HF Trainer, {summary.get('peer_model', 'BertForMaskedLM')}, learning rate "
           f"{summary['peer']['learning_rate']:g} "
           + (f"(best of the sweep {', '.join(f'{k}: {v:.4f}' for k, v in summary['peer_sweep'].items())}), "
              if summary['peer_sweep'] else "(the recipe's), ")
           + f"{'torch.compile, ' if summary.get('peer_compile') else ''}"
           f"{'bf16 autocast' if summary['peer']['bf16_autocast'] else 'f32'}. Target: the peer's final accuracy "
           f"{summary['peer_final_accuracy']:.4f}. Eval: {summary['eval']['num_masked_tokens']} masked tokens, the "
           'same masks for every run.', '',
           '| arm | masked acc. at budget | steps | time to the peer\'s final acc. (s) | speed-up vs the peer |',
           '|---|---:|---:|---:|---:|']
  for name, r in summary['runs'].items():
    t, s = r.get('time_to_peer_final'), r.get('speed_up')
    lines.append(f"| {label(name, summary)} | {r['final_eval']['masked_accuracy']:.4f} | {r['steps_done']} | "
                 f"{'not reached' if t is None else f'{t:.0f}'} | {'-' if s is None else f'{s:.2f}x'} |")
  return '\n'.join(lines + machine_lines(summary))


def machine_lines(summary: dict) -> list[str]:
  cpu = summary['machine']['cpu']
  return ['', f"Machine: {cpu['cores']}-core {cpu['model_name']}, avx512_bf16={cpu['avx512_bf16']}, "
          f"amx_bf16={cpu['amx_bf16']}; load average before: {summary['machine']['load_average_before']}; "
          f"OMP_WAIT_POLICY {summary['machine'].get('omp_wait_policy', 'not recorded')}.", '']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--budget_minutes', type=float, default=10.0, help='training wall time of each final run')
  parser.add_argument('--peer_lrs', default='1e-4,3e-4,1e-3', help="the peer's learning-rate sweep")
  parser.add_argument('--sweep_fraction', type=float, default=0.25, help='budget of each sweep run, a fraction')
  parser.add_argument('--arms', default=','.join(ARMS), help=f'ours: a comma list of {", ".join(ARMS)}')
  parser.add_argument('--root', default='/tmp/time_to_accuracy', help='workdirs, checkpoints, logs, data cache')
  parser.add_argument('--no_peer', action='store_true', help='only our arms: the ablation table (no speed-ups)')
  parser.add_argument('--results', default=HERE, help='folder for results.json, results.md, accuracy_vs_time.png')
  parser.add_argument('--peer_save_seconds', type=float, default=None,
                      help='peer checkpoint interval in training seconds (default: budget / 10)')
  parser.add_argument('--probe_steps', type=int, default=60, help='steps of the timing probe of ours')
  parser.add_argument('--peer_probe_steps', type=int, default=30, help='steps of the timing probe of the peer')
  parser.add_argument('--margin', type=float, default=0.97, help='fraction of the estimated steps to schedule')
  parser.add_argument('--train_files', default=None, help='local text instead of the built-in corpus (tests)')
  parser.add_argument('--validation_files', default=None, help='its validation text')
  parser.add_argument('--peer', default='bert', choices=('bert', 'modernbert'),
                      help="bert: HF's BERT recipe (tiny_bert.py's sizes, 15%% masks, tuned lr); modernbert: the "
                           "equal recipe, configs/tiny.py's model, masks and optimizer in transformers")
  parser.add_argument('--peer_compile', action='store_true', help="the peer's Trainer(torch_compile=True)")
  parser.add_argument('--dtype', default='float32', help="our model.dtype ('auto': bf16 where the CPU has it)")
  parser.add_argument('--_peer', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--lr', type=float, help=argparse.SUPPRESS)
  parser.add_argument('--budget_s', type=float, help=argparse.SUPPRESS)
  parser.add_argument('--save_seconds', type=float, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  parser.add_argument('--tokenizer', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._peer:  # pylint: disable=protected-access
    peer_main(args)
    return
  unknown = set(args.arms.split(',')) - set(ARMS)
  if unknown:
    parser.error(f'unknown --arms {sorted(unknown)}; choose from {", ".join(ARMS)}')
  started, load_before = time.time(), [round(x, 2) for x in os.getloadavg()]
  os.makedirs(args.root, exist_ok=True)
  limit_s = args.budget_minutes * 60
  common = {**data_overrides(args), 'model.dtype': args.dtype, 'progress_bar': False, 'fill_mask_examples': 0,
            'checkpoint_every_steps': 10**9, 'max_checkpoints_to_keep': 1}

  # The quick start's tokenizer, trained by the probe, then given to every run and to the peer.
  probe = ours_probe(args, common)
  tok = os.path.join(args.root, 'tokenizer')
  shutil.rmtree(tok, ignore_errors=True)
  shutil.copytree(os.path.join(probe['workdir'], 'tokenizer'), tok)
  common['data.tokenizer'] = tok
  with open(os.path.join(probe['workdir'], 'config.json')) as f:
    ours_config = json.load(f)
  ours_config['data']['tokenizer'] = tok
  print('probe:', json.dumps(probe), flush=True)

  # The peer: the learning-rate sweep at a fraction of the budget, then the best rate at the full budget.
  sweep, runs, target = {}, {}, None
  lrs = [] if args.no_peer else [float(x) for x in args.peer_lrs.split(',')]
  for lr in lrs if len(lrs) > 1 else []:  # one rate (the equal recipe's): nothing to sweep
    r = peer_run(args, lr, args.sweep_fraction * limit_s, 0, f'peer-sweep-{lr:g}')
    sweep[f'{lr:g}'] = eval_hf(args, r['checkpoints'][-1]['path'], ours_config)['masked_accuracy']
    print(f'peer sweep lr {lr:g}: {sweep[f"{lr:g}"]:.4f}', flush=True)
  if not args.no_peer:
    best = max(sweep, key=sweep.get) if sweep else lrs[0]
    peer = peer_run(args, float(best), limit_s, args.peer_save_seconds or limit_s / 10, 'peer')
    curve = []
    for c in peer['checkpoints']:
      ev = eval_hf(args, c['path'], ours_config)
      curve.append({'step': c['step'], 'train_seconds': c['train_seconds'], 'masked_accuracy': ev['masked_accuracy'],
                    'loss': ev['loss'], 'num_masked_tokens': ev['num_masked_tokens']})
    runs['peer'] = {'final_eval': {**ev, 'step': peer['checkpoints'][-1]['step']}, 'curve': curve,
                    'steps_done': curve[-1]['step'], 'train_seconds': curve[-1]['train_seconds'],
                    **{k: v for k, v in peer.items() if k != 'checkpoints'}}
    target = runs['peer']['final_eval']['masked_accuracy']

  for name in args.arms.split(','):
    arm_probe = probe
    if name in ARM_CONFIGS:  # another model: its own speed sets its steps
      arm_probe = ours_probe(args, common, ARM_CONFIGS[name], f'probe-{name}')
      print(f'probe {name}:', json.dumps(arm_probe), flush=True)
    runs[name] = ours_arm(args, name, common, arm_probe, limit_s)
    runs[name]['probe'] = {k: v for k, v in arm_probe.items() if k != 'workdir'}
    print(name, runs[name]['final_eval'], flush=True)

  counts = {p['num_masked_tokens'] for r in runs.values() for p in r['curve'] if 'num_masked_tokens' in p}
  if len(counts) != 1:
    raise SystemExit(f'evaluation masks differ between the runs: masked tokens {counts}')
  peer_time = None if target is None else time_to(runs['peer']['curve'], target)
  for r in runs.values():
    r['time_to_peer_final'] = None if target is None else time_to(r['curve'], target)
    r['speed_up'] = (round(peer_time / r['time_to_peer_final'], 2)
                     if r['time_to_peer_final'] and peer_time is not None else None)
  summary = {
      'budget_minutes': args.budget_minutes, 'peer_final_accuracy': target, 'peer_sweep': sweep,
      'peer_model': {'bert': 'BertForMaskedLM', 'modernbert': 'ModernBertForMaskedLM (eager attention)'}[args.peer],
      'peer_compile': args.peer_compile, 'dtype': args.dtype,
      'peer_sweep_minutes': None if args.no_peer else args.sweep_fraction * args.budget_minutes,
      'peer': {k: v for k, v in runs.get('peer', {}).items() if k not in ('curve', 'final_eval')} or None,
      'runs': runs,
      'eval': {'num_masked_tokens': counts.pop(), 'rate': ours_config['masking']['eval_rate']},
      'probe_ours': {k: v for k, v in probe.items() if k != 'workdir'},
      'machine': {'cpu': arch.cpu_info(), 'load_average_before': load_before,
                  # torch's speed depends on it (experiments/benchmarks/train_step.py, PASSIVE): on a quiet machine
                  # OpenMP's default (unset) is the peer's faster setting.
                  'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default')},
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
      'total_wall_seconds': round(time.time() - started, 1)}
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.results, 'results.md'), 'w') as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(args.results, 'accuracy_vs_time.png'))
  print(markdown(summary))


if __name__ == '__main__':
  main()
