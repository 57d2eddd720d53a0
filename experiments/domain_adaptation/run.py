"""Domain adaptation with equal compute: general vs general-then-domain vs domain-only pretraining.

  python experiments/domain_adaptation/run.py [--steps 1200] [--root workdirs/domain_adaptation]

1. Corpora: Jane Austen + World English Bible (general) and the Python docs (domain) from Debian packages
   (debian_text.py), split by whole document (chapter / book / source file), validation texts that also
   occur in training dropped; written as JSON lines under ROOT/data/.
2. One WordPiece tokenizer on the union of both training sets (ROOT/tokenizer), given to every run.
3. Runs of `--steps` steps each: `general`; `adapted` (`init_from` the general run's half-way checkpoint: the
   second half on domain text with a fresh optimizer); `domain_only`. Workdirs ROOT/<run>; a rerun resumes.
4. Each final model evaluated on both validation sets; results.json, learning_curves.png and fill-mask
   examples on held-out domain sentences written next to this file.
"""

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # this folder and the repository root

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

import config as experiment_config  # pylint: disable=wrong-import-position
import debian_text  # pylint: disable=wrong-import-position
import downstream  # pylint: disable=wrong-import-position
from mlm_flax import evaluate, inference, plot, train, workdir_json  # pylint: disable=wrong-import-position
from mlm_flax.data import corpora, tokenizer  # pylint: disable=wrong-import-position

GENERAL, DOMAIN = ('austen', 'bible'), ('python_docs',)
VALIDATION_FRACTION = 0.03
RUNS = ('general', 'adapted', 'domain_only')


def build_corpora(root: str, cache: str) -> dict[str, dict[str, str]]:
  """ROOT/data/{general,domain}/{train,validation}.jsonl (built once); returns their paths."""
  paths = {}
  for name, parts in (('general', GENERAL), ('domain', DOMAIN)):
    folder = os.path.join(root, 'data', name)
    paths[name] = {s: os.path.join(folder, f'{s}.jsonl') for s in ('train', 'validation')}
    if os.path.isfile(paths[name]['validation']):
      continue
    docs = []
    for part in parts:
      docs += debian_text.READERS[part](debian_text.fetch(debian_text.PACKAGES[part], cache))
    os.makedirs(folder, exist_ok=True)
    for split, rows in corpora.split_documents(docs, VALIDATION_FRACTION).items():
      with open(paths[name][split] + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps({'text': t, 'source': s}, ensure_ascii=False) + '\n' for s, t in rows)
      os.replace(paths[name][split] + '.tmp', paths[name][split])
  return paths


def replay_mix(root: str, paths: dict[str, dict[str, str]], fraction: float, seed: int = 0) -> str:
  """The adapted run's training file: every domain training text plus general ones drawn (seeded) until
  they make `fraction` of the words. Replaying some general text is the usual guard against forgetting
  in continued pretraining."""
  if fraction <= 0:
    return paths['domain']['train']
  path = os.path.join(root, 'data', f'replay_{fraction:g}', 'train.jsonl')
  if os.path.isfile(path):
    return path
  domain = read_texts(paths['domain']['train'])
  general = read_texts(paths['general']['train'])
  random.Random(seed).shuffle(general)
  budget = fraction / (1 - fraction) * sum(len(t.split()) for t in domain)
  replay, words = [], 0
  for text in general:
    if words >= budget:
      break
    replay.append(text)
    words += len(text.split())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps({'text': t}, ensure_ascii=False) + '\n' for t in domain + replay)
  os.replace(path + '.tmp', path)
  return path


def read_texts(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line)['text'] for line in f]


def corpus_stats(paths: dict[str, dict[str, str]]) -> dict:
  return {f'{name}_{split}': {'texts': len(t), 'words': sum(len(x.split()) for x in t)}
          for name, splits in paths.items() for split, p in splits.items() for t in [read_texts(p)]}


def shared_tokenizer(root: str, paths: dict, vocab_size: int) -> str:
  """One WordPiece vocabulary trained on the union of the training sets, saved once."""
  path = os.path.join(root, 'tokenizer')
  if not os.path.isdir(path):
    texts = read_texts(paths['general']['train']) + read_texts(paths['domain']['train'])
    tokenizer.save_atomic(tokenizer.train_wordpiece(texts, vocab_size), path)
  return path


def run_config(base: ml_collections.ConfigDict, train_files: str, validation_files: str, tok: str,
               steps: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  c.data.dataset, c.data.train_files, c.data.validation_files = '', train_files, validation_files
  c.data.tokenizer, c.num_train_steps = tok, steps
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=None, help='steps per run (default: config.py)')
  parser.add_argument('--root', default='workdirs/domain_adaptation', help='data, tokenizer and workdirs')
  parser.add_argument('--cache', default=os.path.join(os.environ.get('MLM_FLAX_CACHE', '~/.cache/mlm_flax'),
                                                      'debian'), help='downloaded Debian packages')
  parser.add_argument('--replay', type=float, default=experiment_config.REPLAY_FRACTION,
                      help="fraction of the adapted run's second-half words drawn from general text")
  parser.add_argument('--adapt_lr', type=float, default=experiment_config.ADAPT_LEARNING_RATE,
                      help="the adapted run's second-half peak learning rate (default: the config's)")
  parser.add_argument('--runs', default=','.join(RUNS), help='a subset to train (evaluation needs all three)')
  parser.add_argument('--results', default=HERE, help='folder for results.json and learning_curves.png')
  parser.add_argument('--stages', default='pretrain,downstream,qa',
                      help='pretrain (the three runs, their evaluation and plot), downstream (fine-tune each '
                      'pretrained model on both classification tasks: downstream.json and downstream.md) and/or qa '
                      "(fine-tune each, and the same model from random init, on experiments/qa's docstring "
                      'questions: qa.json and qa.md)')
  parser.add_argument('--seeds', type=int, default=3, help='fine-tuning seeds per model and task (downstream)')
  args = parser.parse_args()

  base = experiment_config.get_config()
  steps = args.steps or base.num_train_steps
  half = steps // 2
  base.checkpoint_every_steps = half
  base.eval_every_steps = min(base.eval_every_steps, half)
  start = time.time()
  paths = build_corpora(args.root, os.path.expanduser(args.cache))
  tok = shared_tokenizer(args.root, paths, base.data.tokenizer_vocab_size)
  print(f'Corpora and tokenizer ready in {time.time() - start:.0f}s.', flush=True)

  workdirs = {r: os.path.join(args.root, r) for r in RUNS}
  if 'pretrain' in args.stages.split(','):
    pretrain(args, base, paths, tok, workdirs, start)
  if 'downstream' in args.stages.split(','):
    run_downstream(args, workdirs)
  if 'qa' in args.stages.split(','):
    run_qa(args, base, paths['domain'], tok, workdirs)


def run_qa(args: argparse.Namespace, base: ml_collections.ConfigDict, domain: dict[str, str], tok: str,
           workdirs: dict[str, str]) -> None:
  """Does domain pretraining help question answering on the domain's text? Fine-tunes each pretrained model,
  and the same model from random init (ROOT/random: one step at learning rate 0 on the shared tokenizer, so its
  checkpoint holds the seed's initial params), on experiments/qa's docstring questions with `--seeds` seeds
  (`downstream.QA_FINETUNE`); writes qa.json and qa.md."""
  start = time.time()
  random_init = os.path.join(args.root, 'random')
  config = run_config(base, domain['train'], domain['validation'], tok, 1)
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 0.0, 0
  config.eval_every_steps = config.checkpoint_every_steps = 1
  train.train_and_evaluate(config, random_init)
  paths = downstream.build_qa_task(args.root)
  results = downstream.finetune_all(args.root, {'docstring_qa': paths}, {**workdirs, 'random': random_init},
                                    seeds=args.seeds, task_type='question_answering')
  table = downstream.qa_table(results)
  print(table, flush=True)
  sizes = {}
  for split, path in paths.items():
    with open(path, encoding='utf-8') as f:
      rows = [json.loads(line) for line in f if line.strip()]
    sizes[split] = {'questions': len(rows), 'modules': len({r['title'] for r in rows})}
  workdir_json.write_json(os.path.join(args.results, 'qa.json'), {
      'task': sizes, 'recipe': downstream.QA_FINETUNE, 'seeds': args.seeds, 'results': results,
      'wall_seconds': round(time.time() - start, 1)})
  with open(os.path.join(args.results, 'qa.md'), 'w', encoding='utf-8') as f:
    f.write(table + '\n')


def run_downstream(args: argparse.Namespace, workdirs: dict[str, str]) -> None:
  """Fine-tunes each pretrained model on the domain task and the general task (`downstream.py`) with
  `--seeds` seeds; writes downstream.json (every results.json, the tasks' sizes and baselines) and downstream.md."""
  start = time.time()
  task_paths = downstream.build_tasks(args.root, os.path.expanduser(args.cache))
  tasks = {name: downstream.describe(p) for name, p in task_paths.items()}
  bow = {name: downstream.bag_of_words(p) for name, p in task_paths.items()}
  print('TF-IDF + logistic regression:', json.dumps(bow), flush=True)
  results = downstream.finetune_all(args.root, task_paths, workdirs, seeds=args.seeds)
  probes = {task: {name: linear_probe(args.root, name, task, w, p) for name, w in workdirs.items()}
            for task, p in task_paths.items()}
  print('linear probes:', json.dumps(probes), flush=True)
  table = downstream.table(results, {t: d['majority_baseline_test_accuracy'] for t, d in tasks.items()}, bow,
                           probes)
  print(table, flush=True)
  with open(os.path.join(args.results, 'downstream.json'), 'w') as f:
    json.dump({'tasks': tasks, 'recipe': downstream.FINETUNE, 'seeds': args.seeds, 'bag_of_words': bow,
               'linear_probe': probes,
               'results': results,
               'wall_seconds': round(time.time() - start, 1)}, f, indent=2, ensure_ascii=False)
  with open(os.path.join(args.results, 'downstream.md'), 'w') as f:
    f.write(table + '\n')


def linear_probe(root: str, name: str, task: str, workdir: str, paths: dict[str, str]) -> dict:
  """`downstream.linear_probe`, kept in ROOT/linear_probe/NAME/TASK.json: a rerun reuses it."""
  path = os.path.join(root, 'linear_probe', name, f'{task}.json')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  result = downstream.linear_probe(workdir, paths)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_json.write_json(path, result)  # atomic: an interrupted rerun never reuses half a file
  return result


def pretrain(args: argparse.Namespace, base: ml_collections.ConfigDict, paths: dict, tok: str,
             workdirs: dict[str, str], start: float) -> None:
  """The three pretraining runs, each final model on both validation sets, the curves and fill-mask examples."""
  steps = args.steps or base.num_train_steps
  half = steps // 2
  domain_val, general_val = paths['domain']['validation'], paths['general']['validation']
  plan = {'general': (paths['general']['train'], steps),
          'adapted': (replay_mix(args.root, paths, args.replay), steps - half),
          'domain_only': (paths['domain']['train'], steps)}
  results = {}
  for name in args.runs.split(','):
    print(f'=== {name} ===', flush=True)
    t = time.time()
    config = run_config(base, plan[name][0], domain_val, tok, plan[name][1])
    if name == 'adapted':  # the general run's half-way params, a fresh optimizer (config key init_from)
      config.init_from = f"{workdirs['general']}:{half}"
      if args.adapt_lr:
        config.optimizer.learning_rate = args.adapt_lr
    train.train_and_evaluate(config, workdirs[name])
    results[name] = {'steps': steps, 'tokens': steps * base.batch_size * base.max_seq_length,
                     'wall_seconds': round(time.time() - t, 1)}
    if name == 'adapted':
      results[name].update(general_steps=half, domain_steps=steps - half, replay_fraction=args.replay,
                           learning_rate=config.optimizer.learning_rate,
                           note='wall_seconds: the second half only; the first half is the general run')

  for name in results:  # each final model on both validation sets
    for which, path in (('domain', domain_val), ('general', general_val)):
      ev = evaluate.evaluate_workdir(workdirs[name], files=path)
      results[name].update({f'{which}_val_masked_accuracy': round(ev['masked_accuracy'], 4),
                            f'{which}_val_loss': round(ev['loss'], 4),
                            f'{which}_val_masked_tokens': ev['num_masked_tokens']})
    print(name, json.dumps(results[name]), flush=True)
  if set(results) != set(RUNS):
    return  # a subset (--runs): no comparison to write

  # Learning curves on the domain validation set; the adapted run continues the general run's first half.
  curves = {name: plot.read_run(workdirs[name]) for name in RUNS}
  curves['adapted'] = ([r for r in curves['general'] if r['step'] <= half]
                       + [{**r, 'step': r['step'] + half} for r in curves['adapted']])
  plot.plot_curves(curves, os.path.join(args.results, 'learning_curves.png'), metrics=('masked_accuracy',),
                   splits=('eval',), title=f'Domain (Python docs) validation; adapted switches at step {half}')

  models = {name: inference.load(workdirs[name]) for name in RUNS}
  examples = []
  for text, answer in inference.held_out_examples(read_texts(domain_val), models['general'].tokenizer, 8):
    row = {'text': text, 'answer': answer}
    for name, mlm in models.items():
      row[name] = [p['token_str'] for p in inference.fill_mask(mlm, text, top_k=3)]
    examples.append(row)

  summary = {
      'runs': results,
      'adapted_minus_general': {
          'domain_val_masked_accuracy': round(results['adapted']['domain_val_masked_accuracy']
                                              - results['general']['domain_val_masked_accuracy'], 4),
          'general_val_masked_accuracy': round(results['adapted']['general_val_masked_accuracy']
                                               - results['general']['general_val_masked_accuracy'], 4)},
      'config': {k: base[k] for k in ('batch_size', 'max_seq_length')} | {
          'steps_per_run': steps, 'model': {k: base.model[k] for k in ('num_layers', 'hidden_size', 'num_heads')},
          'vocab_size': base.data.tokenizer_vocab_size, 'train_masking_rate': base.masking.rate,
          'eval_masking_rate': base.masking.eval_rate},
      'corpora': corpus_stats(paths),
      'fill_mask_examples': examples,
      'total_wall_seconds': round(time.time() - start, 1),
  }
  with open(os.path.join(args.results, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  print(json.dumps(summary['adapted_minus_general']))


if __name__ == '__main__':
  main()
