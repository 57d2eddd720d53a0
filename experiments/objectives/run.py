"""Does our pretraining help downstream? MLM vs ELECTRA vs no pretraining, at equal pretraining compute.

  python experiments/objectives/run.py [--out experiments/objectives/runs] [--budget_steps 4400] [--seeds 3]
                                       [--tasks pydoc_chapter,docstring_topics]

Arms, all on the built-in corpus (`builtin:stdlib_docs`), one after the other in this process:
- `mlm`: the quick start, `configs/tiny.py` (3-layer ModernBERT-style encoder), `--budget_steps` steps;
- `electra`: the same model as the discriminator (`configs/tiny.py` with `tiny_electra.electra`'s keys: 15%
  masks, lr 1e-3, a quarter-width generator sharing its embeddings, λ = 50), as many steps as take the MLM
  budget's time: both train steps are timed back to back in one
  process (after compilation, alternating rounds of `--timing_steps` steps, median), warmup 1/7 of its steps;
- `random`: `configs/tiny.py` from random init: a 1-step run at learning rate 0 (the seed's initial params);
and both pretrained arms again at their half-way checkpoint (`DIR:STEP`), a second point on the time axis.
Each model is fine-tuned with every recipe of `--recipes` (`mlm-flax finetune`'s defaults, `configs/finetune.py`,
and `RECIPES`: the domain study's lr 1e-3 / batch 32 recipe for these small models, 3 or 10 epochs, and lr 3e-4 x
10 epochs) and `--seeds` seeds (`downstream.finetune_all` of experiments/domain_adaptation) on
- `pydoc_chapter`: the domain study's Debian task (Python Library Reference chapter of a paragraph, 21 classes;
  `downstream.build_tasks`), the training split capped at `--pydoc_train` rows to fit a CPU hour;
- `docstring_topics`: `mlm_flax.data.corpora.docstring_topics` (5 stdlib package families), every 5th
  training row held out for validation (best-step selection), test as finetune_defaults;
plus a TF-IDF + logistic regression reference (`downstream.bag_of_words`); each arm's recipe is then chosen on
validation accuracy (`selected`; the test set chooses nothing). Writes results.json, results.md and objectives.png next to this file (`--results`). Workdirs under `--out` (resumable: a
rerun skips finished runs).
"""

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), 'domain_adaptation'), os.path.dirname(os.path.dirname(HERE))]

import downstream  # pylint: disable=wrong-import-position  # experiments/domain_adaptation
import ml_collections  # pylint: disable=wrong-import-position
from mlm_flax import train, workdir_json, writers  # pylint: disable=wrong-import-position
from mlm_flax.configs import finetune as finetune_config  # pylint: disable=wrong-import-position
from mlm_flax.configs import tiny, tiny_electra  # pylint: disable=wrong-import-position
from mlm_flax.data import corpora  # pylint: disable=wrong-import-position

ARMS = ('mlm', 'electra', 'random')


def cpu() -> dict:
  flags = open('/proc/cpuinfo').read()
  model = next((l.split(':', 1)[1].strip() for l in flags.splitlines() if l.startswith('model name')), platform.processor())
  return {'model': model, 'cores': os.cpu_count(), 'avx512_bf16': 'avx512_bf16' in flags,
          'amx_bf16': 'amx_bf16' in flags}


def arm_config(arm: str, steps: int) -> ml_collections.ConfigDict:
  """The pretraining config of `arm` at `steps` steps (checkpoints at half and at the end)."""
  c = tiny_electra.electra(tiny.get_config()) if arm == 'electra' else tiny.get_config()
  c.progress_bar = False
  if arm == 'random':  # one step at learning rate 0: the checkpoint holds the seed's initial params
    c.num_train_steps, c.optimizer.learning_rate, c.optimizer.warmup_steps = 1, 0.0, 0
    c.eval_every_steps = c.checkpoint_every_steps = 1
    return c
  c.num_train_steps = steps
  c.optimizer.warmup_steps = round(steps / 7)  # both configs warm up over 1/7 of their steps
  c.checkpoint_every_steps = steps // 2
  c.eval_every_steps = min(c.eval_every_steps, steps // 2)
  return c


def step_times(root: str, steps: int, timing_steps: int, rounds: int) -> dict:
  """Median seconds per train step of MLM and ELECTRA, timed back to back in this process (cached)."""
  path = os.path.join(root, 'timing.json')
  if os.path.isfile(path):
    return json.load(open(path))
  import jax  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    runs = {a: train._set_up(arm_config(a, steps), os.path.join(root, 'timing', a), stack)  # pylint: disable=protected-access
            for a in ('mlm', 'electra')}
    states, times = {a: r.state for a, r in runs.items()}, {a: [] for a in runs}
    for a, r in runs.items():  # compile and warm up
      states[a], m = r.step(states[a], next(r.batches)[0])
      jax.block_until_ready(m)
    for _ in range(rounds):
      for a, r in runs.items():
        batches = [next(r.batches)[0] for _ in range(timing_steps)]
        start = time.perf_counter()
        for b in batches:
          states[a], m = r.step(states[a], b)
        jax.block_until_ready(m)
        times[a].append((time.perf_counter() - start) / timing_steps)
  out = {'seconds_per_step': {a: statistics.median(t) for a, t in times.items()}, 'rounds': times,
         'timing_steps': timing_steps}
  out['electra_steps'] = round(steps * out['seconds_per_step']['mlm'] / out['seconds_per_step']['electra'])
  workdir_json.write_json(path, out)
  return out


def pretrain(root: str, steps: dict[str, int], report_only: bool = False) -> dict:
  """Trains (or resumes, or just reports) each arm's workdir (the arms in `steps`); returns steps, eval and wall
  time per arm."""
  out = {}
  for arm in steps:
    workdir = os.path.join(root, 'pretrain', arm)
    if not report_only:
      print(f'=== pretraining {arm}: {steps[arm]} steps in {workdir} ===', flush=True)
      train.train_and_evaluate(arm_config(arm, steps[arm]), workdir)
    rows = writers.read_metrics(workdir)
    out[arm] = {'steps': steps[arm], 'workdir': workdir,
                'eval': [{k: v for k, v in r.items() if k != 'split'} for r in rows if r['split'] == 'eval'][-1],
                'wall_seconds': max((r.get('wall_seconds', 0) for r in rows), default=0),
                'eval_curve': [{k: r[k] for k in r if k in ('step', 'masked_accuracy', 'disc_auc', 'loss')}
                               for r in rows if r['split'] == 'eval']}
  return out


def build_tasks(root: str, names: list[str], cache: str, pydoc_train: int) -> dict[str, dict[str, str]]:
  """ROOT/tasks/NAME/{train,validation,test}.jsonl of the requested tasks (built once)."""
  paths = {}
  if 'pydoc_chapter' in names:
    downstream.MAX_ROWS['train'] = pydoc_train  # the same seeded order, cut shorter
    downstream.TASKS = {'pydoc_chapter': downstream.TASKS['pydoc_chapter']}
    paths.update(downstream.build_tasks(root, cache))
  if 'docstring_topics' in names:
    folder = os.path.join(root, 'tasks', 'docstring_topics')
    paths['docstring_topics'] = {s: os.path.join(folder, f'{s}.jsonl') for s in downstream.SPLITS}
    rows = corpora.docstring_topics()
    splits = {'train': [r for i, r in enumerate(rows['train']) if i % 5],
              'validation': [r for i, r in enumerate(rows['train']) if not i % 5], 'test': rows['test']}
    os.makedirs(folder, exist_ok=True)
    for split, split_rows in splits.items():
      with open(paths['docstring_topics'][split], 'w', encoding='utf-8') as f:
        f.writelines(json.dumps({'text': r['text'], 'label': r['label']}) + '\n' for r in split_rows)
  return paths


def plot(results: dict, pre: dict, seconds: dict, bow: dict, out: str, recipes: list[str], chosen: dict) -> None:
  """Test accuracy (mean ± std over seeds) against pretraining compute, one panel per task: the pretrained arms
  per recipe (line style), random init as a band (its validation-chosen recipe: `chosen`, from `selected`),
  TF-IDF dotted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.6), squeeze=False)
  styles = [('' if r == 'default' else f'{r}/', r, ls) for r, ls in zip(recipes, ('-', ':', '--', '-.'))]
  for ax, (task, per_model) in zip(axes[0], results.items()):
    for (arm, color), (prefix, name, style) in itertools.product((('mlm', 'C0'), ('electra', 'C1')), styles):
      points = sorted((seconds[arm] * s / 60, per_model[prefix + m]['metrics'])
                      for m, s in model_steps(pre).items() if arm_of(m) == arm and prefix + m in per_model)
      if points:
        ax.errorbar([p[0] for p in points], [p[1]['test_accuracy'] for p in points],
                    yerr=[p[1]['test_accuracy_std'] for p in points], marker='o', capsize=4, color=color, ls=style,
                    label=f'{arm}, {name} recipe')
    rand = chosen.get(task, {}).get('random')
    if rand:
      mean, std = rand['test_accuracy'], rand['test_accuracy_std']
      ax.axhspan(mean - std, mean + std, color='C2', alpha=0.25, label=f"random init ({rand['recipe']} recipe, ± std)")
    ax.axhline(bow[task]['test_accuracy'], color='grey', ls=(0, (1, 4)), label='TF-IDF + logistic regression')
    ax.set(title=task, xlabel='pretraining compute (minutes of train steps, timed)', ylabel='test accuracy')
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=4, fontsize=8)
  fig.tight_layout(rect=(0, 0.16, 1, 1))
  fig.savefig(out, dpi=120)


# Fine-tuning recipes (`--recipes`), as overrides of the domain study's (`downstream.FINETUNE`: lr 1e-3, batch 32,
# 3 epochs, 10% warmup, weight decay 0.01; chosen there for these small models). `default` is configs/finetune.py's.
RECIPES = {'lr1e-3': {}, 'lr1e-3x10': {'num_epochs': 10}, 'lr3e-4x10': {'num_epochs': 10, 'optimizer.learning_rate': 3e-4}}


def recipe(name: str) -> dict:
  """`downstream.finetune_all`'s overrides: `default` sets its recipe keys back to configs/finetune.py's (Trainer's:
  5e-5, batch 8, no warmup, no weight decay); the others are `RECIPES[name]`."""
  if name != 'default':
    return RECIPES[name]
  c = finetune_config.get_config()
  return {k: c[k.split('.')[0]][k.split('.')[1]] if '.' in k else c[k] for k in downstream.FINETUNE}


def selected(results: dict, recipes: list[str]) -> dict:
  """Each arm's final model with its own best recipe: per task and arm, the recipe of the highest mean validation
  accuracy (the best step's, as results.json reports it; the test set chooses nothing); its test accuracy."""
  out = {}
  for task, per_model in results.items():
    for arm in ARMS:
      runs = {r: per_model.get(arm if r == 'default' else f'{r}/{arm}') for r in recipes}
      runs = {r: m['metrics'] for r, m in runs.items() if m}
      if runs:
        best = max(runs, key=lambda r: runs[r]['accuracy'])
        out.setdefault(task, {})[arm] = {'recipe': best, 'validation_accuracy': runs[best]['accuracy'],
                                         'test_accuracy': runs[best]['test_accuracy'],
                                         'test_accuracy_std': runs[best]['test_accuracy_std']}
  return out


def selected_table(chosen: dict) -> str:
  """Markdown of `selected`: one row per task and arm."""
  lines = ['| task | model | recipe (best validation accuracy) | validation accuracy | test accuracy |',
           '|---|---|---|---:|---:|']
  for task, per_arm in chosen.items():
    for arm, c in per_arm.items():
      lines.append(f"| `{task}` | `{arm}` | `{c['recipe']}` | {c['validation_accuracy']:.3f} | "
                   f"{c['test_accuracy']:.3f} ± {c['test_accuracy_std']:.3f} |")
  return '\n'.join(lines)


def arm_of(model: str) -> str:
  """`lr1e-3/mlm@550` -> `mlm`."""
  return model.split('/')[-1].split('@')[0]


def model_steps(pre: dict) -> dict[str, int]:
  """Models fine-tuned: each arm's final checkpoint, and the pretrained arms' half-way one (`ARM@STEP`)."""
  out = {arm: p['steps'] for arm, p in pre.items()}
  out.update({f'{arm}@{pre[arm]["steps"] // 2}': pre[arm]['steps'] // 2 for arm in ('mlm', 'electra') if arm in pre})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.path.join(HERE, 'runs'), help='workdirs, tasks and caches')
  # 4x the quick start's steps: where MLM pulls clear of random init on pydoc_chapter and passes TF-IDF (README).
  parser.add_argument('--budget_steps', type=int, default=4 * tiny.get_config().num_train_steps,
                      help="MLM's steps (default: 4x configs/tiny.py's); ELECTRA gets the steps of equal time")
  parser.add_argument('--arms', default=','.join(ARMS), help='a subset of mlm,electra,random')
  parser.add_argument('--results', default=HERE, help='folder for results.json, results.md and objectives.png')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--tasks', default='pydoc_chapter,docstring_topics')
  parser.add_argument('--pydoc_train', type=int, default=1500, help="pydoc_chapter's training rows")
  parser.add_argument('--half', action=argparse.BooleanOptionalAction, default=True,
                      help='also fine-tune the half-way checkpoints (after the final ones)')
  parser.add_argument('--recipes', default='default,' + ','.join(RECIPES),
                      help='fine-tuning recipes, comma-separated: default (configs/finetune.py) and/or RECIPES\' '
                      f"({', '.join(RECIPES)}); models of a non-default one are named RECIPE/MODEL")
  parser.add_argument('--report_only', action='store_true',
                      help='train nothing: write results.* from the runs finished so far')
  parser.add_argument('--timing_steps', type=int, default=20)
  parser.add_argument('--timing_rounds', type=int, default=5)
  parser.add_argument('--cache', default=os.path.expanduser(os.path.join(
      os.environ.get('MLM_FLAX_CACHE', '~/.cache/mlm_flax'), 'debian')), help='downloaded Debian packages')
  args = parser.parse_args()
  unknown = set(args.recipes.split(',')) - set(RECIPES) - {'default'}
  if unknown:
    parser.error(f'--recipes: {", ".join(sorted(unknown))} not in default, {", ".join(RECIPES)}')
  arms = args.arms.split(',')
  if not set(arms) <= set(ARMS):
    parser.error(f'--arms {args.arms}: each arm must be one of {",".join(ARMS)}')
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  timing = step_times(args.out, args.budget_steps, args.timing_steps, args.timing_rounds)
  print('step times:', json.dumps(timing['seconds_per_step']), 'ELECTRA steps:', timing['electra_steps'], flush=True)
  budget = {'mlm': args.budget_steps, 'electra': timing['electra_steps'], 'random': 1}
  pre = pretrain(args.out, {a: budget[a] for a in ARMS if a in arms}, args.report_only)

  task_paths = build_tasks(args.out, args.tasks.split(','), args.cache, args.pydoc_train)
  bow = {t: downstream.bag_of_words(p) for t, p in task_paths.items()}
  print('TF-IDF + logistic regression:', json.dumps(bow), flush=True)
  steps = model_steps(pre)
  results = {t: {} for t in task_paths}
  for half in (False, True) if args.half else (False,):  # every recipe's final models first
    for name in args.recipes.split(','):
      prefix = '' if name == 'default' else f'{name}/'
      models = {prefix + m: pre[arm_of(m)]['workdir'] + (f':{s}' if half else '')
                for m, s in steps.items() if ('@' in m) == half}
      if args.report_only:  # what has finished so far
        for task, m in itertools.product(task_paths, models):
          path = os.path.join(args.out, 'finetune', m, task, 'results.json')
          if os.path.isfile(path):
            results[task][m] = json.load(open(path))
        continue
      for task, per_model in downstream.finetune_all(args.out, task_paths, models, args.seeds,
                                                     recipe(name)).items():
        results[task].update(per_model)

  seconds = timing['seconds_per_step']
  tasks = {t: downstream.describe(p) for t, p in task_paths.items()}
  table = downstream.table(results, {t: d['majority_baseline_test_accuracy'] for t, d in tasks.items()}, bow)
  table = '\n'.join('|'.join(line.split('|')[:-3] + ['']) for line in table.splitlines())  # no probe columns
  pre_table = ['| model | pretraining steps | compute (timed step x steps) | final eval masked acc. (MLM / '
               'generator) | wall time |', '|---|---:|---:|---:|---:|']
  for m, s in steps.items():
    arm = arm_of(m)
    at = [r for r in pre[arm]['eval_curve'] if r['step'] <= s][-1]  # the last eval at or before step s
    acc = f"{at['masked_accuracy']:.3f}" + (f" (step {at['step']})" if at['step'] != s else '')
    wall = '(same run)' if '@' in m else f"{pre[arm]['wall_seconds'] / 60:.1f} min"
    pre_table.append(f"| `{m}` | {s} | {0 if arm == 'random' else seconds[arm] * s / 60:.1f} min | "
                     f"{acc} | {wall} |")
  chosen = selected(results, args.recipes.split(','))
  text = '\n'.join(pre_table) + '\n\n' + table + '\n\n' + selected_table(chosen) + '\n'
  print(text, flush=True)
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, 'results.md'), 'w') as f:
    f.write(text)
  plot(results, pre, seconds, bow, os.path.join(args.results, 'objectives.png'), args.recipes.split(','), chosen)
  workdir_json.write_json(os.path.join(args.results, 'results.json'), {
      'cpu': cpu(), 'budget_steps': args.budget_steps, 'timing': timing, 'pretraining': pre, 'models': steps,
      'finetune_recipes': {r: {**downstream.FINETUNE, **recipe(r)} for r in args.recipes.split(',')}, 'seeds': args.seeds, 'tasks': tasks,
      'pydoc_train_rows': args.pydoc_train, 'bag_of_words': bow, 'results': results, 'selected': chosen,
      'wall_seconds_this_invocation': round(time.time() - start, 1)})


if __name__ == '__main__':
  print('CPU:', json.dumps(cpu()), flush=True)
  main()
