"""`mlm-flax` command line: train | eval | fill-mask | classify | answer | export | import | plot.

  mlm-flax train [--config configs/tiny.py] [--workdir DIR] [--config.KEY=VALUE ...]
  mlm-flax eval --workdir DIR [--split validation]
  mlm-flax fill-mask --model DIR [--top_k 5] [--targets a,b] [--dtype float32] TEXT ...
  mlm-flax classify --model DIR [--top_k K] [--dtype float32] TEXT ...
  mlm-flax answer --model DIR (--question Q --context C | --input FILE.json) [--top_k K] [--max_answer_len 15]
      [--max_seq_len N] [--doc_stride N] [--handle_impossible_answer] [--dtype float32]
  mlm-flax export --workdir DIR --out HF_DIR
  mlm-flax import --hf HF_DIR --workdir DIR
  mlm-flax finetune --init MODEL --workdir DIR [--config configs/finetune.py] [--config.KEY=VALUE ...]
  mlm-flax plot --workdir DIR[,DIR2,...] [--out PNG]
  mlm-flax sweep [--config FILE] --sweep KEY=V1,V2 [--sweep FILE.py[:get_sweep]] [--seeds N] [--workdir ROOT]
      [--command train|finetune] [--dry_run] [--emit slurm|commands] [--config.KEY=VALUE ...] [-- ARGS ...]
  mlm-flax compare DIR ... [--csv FILE] [--plot PNG]
"""

import difflib
import importlib.util
import json
import os
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from mlm_flax import configs
from mlm_flax.sweep import default_workdir  # train's default --workdir (the sweep names its points with it)

# transformers (tokenizers, configs, file utilities here: the models are JAX) advises at import that PyTorch was
# not found; set before it is imported, so a JAX-only install prints no such line. Set it to '' to see them.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

SWEEP_FLAGS = ('config', 'workdir', 'sweep', 'seeds', 'command', 'dry_run', 'emit')  # the others pass to the points
DEFAULT_CONFIG = os.path.join(list(configs.__path__)[0], 'tiny.py')  # installed with the package
FINETUNE_CONFIG = os.path.join(list(configs.__path__)[0], 'finetune.py')  # `finetune`'s default

FLAGS = flags.FLAGS


def _default_config(argv: list[str]) -> str:
  """The config file used without --config: configs/finetune.py for `finetune`, configs/tiny.py otherwise."""
  return FINETUNE_CONFIG if len(argv) > 1 and argv[1] == 'finetune' else DEFAULT_CONFIG


def define_flags(argv: list[str] = ()) -> None:
  """Defined at start-up, after `check_overrides` (config_flags reads sys.argv when defined)."""
  config_flags.DEFINE_config_file('config', _default_config(argv), 'Experiment config file (train, finetune).')
  flags.DEFINE_string('init', None, 'Model to fine-tune (finetune): a workdir (DIR or DIR:STEP), a Hugging Face '
                      'folder or hub name.')
  flags.DEFINE_string('workdir', None, 'Run folder; default: workdirs/<config name>[-<overrides>].')
  flags.DEFINE_string('split', 'validation', 'Split to evaluate (eval).')
  flags.DEFINE_string('model', None, 'Workdir or Hugging Face folder to load (fill-mask, classify, answer).')
  flags.DEFINE_integer('top_k', 5, 'Predictions per mask (fill-mask, default 5); labels per text (classify; '
                       'default: the best label only, as pipeline("text-classification")).')
  flags.DEFINE_list('targets', None, 'Restrict fill-mask scoring to these words (fill-mask).')
  flags.DEFINE_string('dtype', None, 'Compute dtype (fill-mask, classify): float32 (default; answers as transformers), '
                      'bfloat16, float16 or auto (as training: bf16 on GPU/TPU/AMX CPUs).')
  flags.DEFINE_string('question', None, 'The question (answer).')
  flags.DEFINE_string('context', None, 'The text holding the answer (answer).')
  flags.DEFINE_string('input', None, 'A JSON file: a list of {"question", "context"} (answer).')
  flags.DEFINE_bool('handle_impossible_answer', False, 'Allow the empty answer (answer; SQuAD v2 models).')
  flags.DEFINE_integer('max_answer_len', 15, 'Longest answer in tokens (answer; the pipeline\'s default 15).')
  flags.DEFINE_integer('max_seq_len', None, 'Window length in tokens (answer; default min(384, the model\'s)).')
  flags.DEFINE_integer('doc_stride', None, 'Overlap of windows in tokens (answer; default min(max_seq_len // 2, '
                       '128)).')
  flags.DEFINE_string('out', None, 'Hugging Face folder to write (export); PNG to write (plot).')
  flags.DEFINE_string('hf', None, 'Hugging Face model folder or hub name to import (import).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
  flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
  flags.DEFINE_multi_string('sweep', [], 'KEY=V1,V2,... or FILE.py[:get_sweep] (sweep; the points: their product).')
  flags.DEFINE_integer('seeds', None, 'Run every point with seed=0..N-1 (sweep).')
  flags.DEFINE_enum('command', 'train', ['train', 'finetune'], 'What each point runs (sweep).')
  flags.DEFINE_bool('dry_run', False, 'List the points and their commands; run nothing (sweep).')
  flags.DEFINE_enum('emit', None, ['slurm', 'commands'], 'Write ROOT/commands.txt (and ROOT/sweep.sbatch, an '
                    'array job) instead of running the points (sweep).')
  flags.DEFINE_string('csv', None, 'CSV file of the compared runs (compare).')
  flags.DEFINE_string('plot', None, 'PNG of all runs\' eval curves on one figure (compare).')


def _run(command: str, args: list[str]) -> None:
  if FLAGS.dtype is not None and command not in ('fill-mask', 'classify', 'answer'):
    hint = ('set --config.model.dtype=... instead' if command in ('train', 'finetune')
            else 'eval and export compute in float32')
    raise ValueError(f'--dtype is a fill-mask, classify and answer flag; {command} does not take it ({hint}).')
  COMMANDS[command](args)


def _plot(args: list[str]) -> None:  # no JAX needed
  from mlm_flax import plot  # pylint: disable=g-import-not-at-top
  if not FLAGS.workdir:
    raise ValueError('usage: mlm-flax plot --workdir DIR[,DIR2,...] [--out PNG]')
  print(json.dumps({'plot': plot.plot_runs(FLAGS.workdir.split(','), FLAGS.out)}))


def _compare(args: list[str]) -> None:  # no JAX needed
  from mlm_flax import compare  # pylint: disable=g-import-not-at-top
  if not args:
    raise ValueError('usage: mlm-flax compare DIR ... [--csv FILE] [--plot PNG] (workdirs or sweep roots)')
  print(compare.compare(args, FLAGS.csv, FLAGS.plot))
  for what, path in (('CSV', FLAGS.csv), ('plot', FLAGS.plot)):
    if path:
      print(f'Wrote the {what} to {path}', file=sys.stderr)


def _train(args: list[str]) -> None:
  """A bad config fails in a second, before the heavy imports and any data work."""
  import jax  # pylint: disable=g-import-not-at-top
  from mlm_flax import parallel, validation  # pylint: disable=g-import-not-at-top
  parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  overrides = config_flags.get_override_values(FLAGS['config'])
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']), overrides)
  config = validation.adopt_imported(FLAGS.config, workdir, set_keys=overrides)
  validation.validate_config(config, jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    print(f'Workdir: {workdir}', flush=True)
  from mlm_flax import train  # pylint: disable=g-import-not-at-top
  print(json.dumps(train.train_and_evaluate(config, workdir)))


def _finetune(args: list[str]) -> None:
  """A bad config fails in a second, before the model and the data are loaded."""
  import jax  # pylint: disable=g-import-not-at-top
  from mlm_flax import finetune, parallel  # pylint: disable=g-import-not-at-top
  if not FLAGS.init or not FLAGS.workdir:
    raise ValueError('usage: mlm-flax finetune --init MODEL --workdir DIR [--config configs/finetune.py] '
                     '[--config.KEY=VALUE ...]')
  parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  finetune.validate(FLAGS.config, jax.device_count(), jax.process_count())
  print(json.dumps(finetune.finetune(FLAGS.config, FLAGS.init, FLAGS.workdir)))


def _eval(args: list[str]) -> None:
  if not FLAGS.workdir:
    raise ValueError('eval needs --workdir DIR (a folder written by `mlm-flax train`).')
  from mlm_flax import evaluate  # pylint: disable=g-import-not-at-top
  print(json.dumps(evaluate.evaluate_workdir(FLAGS.workdir, FLAGS.split)))


def _fill_mask(args: list[str]) -> None:
  if not FLAGS.model or not args:
    raise ValueError('usage: mlm-flax fill-mask --model DIR [--top_k 5] "text with a [MASK]" ...')
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  mlm = inference.load(FLAGS.model, dtype=FLAGS.dtype)
  print(json.dumps(inference.fill_mask(mlm, args[0] if len(args) == 1 else args, top_k=FLAGS.top_k,
                                       targets=FLAGS.targets), indent=1))


def _classify(args: list[str]) -> None:
  if not FLAGS.model or not args:
    raise ValueError('usage: mlm-flax classify --model DIR [--top_k K] "text" ... (DIR: a fine-tuned workdir or a '
                     'Hugging Face *ForSequenceClassification / *ForTokenClassification folder)')
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  clf = inference.load_classifier(FLAGS.model, dtype=FLAGS.dtype)
  top_k = {'top_k': FLAGS.top_k} if FLAGS['top_k'].present else {}
  print(json.dumps(inference.classify(clf, args[0] if len(args) == 1 else args, **top_k), indent=1))


def _answer(args: list[str]) -> None:
  """`mlm-flax answer`: pipeline("question-answering")'s output for --question/--context or --input's list."""
  from mlm_flax import answer  # pylint: disable=g-import-not-at-top
  inputs = _answer_inputs()
  model = answer.load_qa(FLAGS.model, dtype=FLAGS.dtype)
  print(json.dumps(answer.answer(model, inputs, top_k=FLAGS.top_k if FLAGS['top_k'].present else 1,
                                 handle_impossible_answer=FLAGS.handle_impossible_answer,
                                 max_answer_len=FLAGS.max_answer_len, doc_stride=FLAGS.doc_stride,
                                 max_seq_len=FLAGS.max_seq_len), indent=1))


def _answer_inputs() -> dict | list:
  """The question/context pair of the flags, or --input's JSON; usage errors before the model is loaded."""
  if not FLAGS.model or (FLAGS.input is None) == (FLAGS.question is None or FLAGS.context is None):
    raise ValueError('usage: mlm-flax answer --model DIR (--question Q --context C | --input FILE.json) [--top_k K] '
                     '(DIR: a question-answering workdir or a Hugging Face *ForQuestionAnswering folder)')
  if FLAGS.input is None:
    return {'question': FLAGS.question, 'context': FLAGS.context}
  with open(FLAGS.input) as f:
    inputs = json.load(f)
  if not isinstance(inputs, (list, dict)):
    raise ValueError(f'--input {FLAGS.input} holds a {type(inputs).__name__}; give a JSON list of '
                     '{"question": ..., "context": ...}.')
  return inputs


def _export_command(args: list[str]) -> None:
  if not FLAGS.workdir or not FLAGS.out:
    raise ValueError('usage: mlm-flax export --workdir DIR --out HF_DIR')
  _export(FLAGS.workdir, FLAGS.out)
  print(json.dumps({'exported': FLAGS.out}))


def _import(args: list[str]) -> None:
  if not FLAGS.hf or not FLAGS.workdir:
    raise ValueError('usage: mlm-flax import --hf HF_DIR --workdir DIR')
  from mlm_flax.interop import electra, hf  # pylint: disable=g-import-not-at-top
  importer = electra.import_to_workdir if electra.is_pair(FLAGS.hf) else hf.import_to_workdir
  print(json.dumps(importer(FLAGS.hf, FLAGS.workdir)))


def _export(workdir: str, out: str) -> None:
  """`mlm-flax export`: a fine-tuned workdir as its `*For*Classification` / `*ForQuestionAnswering`, a
  pretraining run as `*ForMaskedLM`, an ELECTRA run as `ElectraForPreTraining` with its generator
  (`ElectraForMaskedLM`) in `OUT/generator`."""
  from mlm_flax import inference, workdir_json  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import electra, hf  # pylint: disable=g-import-not-at-top
  from mlm_flax.objectives import objective_type  # pylint: disable=g-import-not-at-top
  if inference.is_task_model(workdir):
    return hf.export(inference.load_classifier(workdir), out)
  if objective_type(ml_collections.ConfigDict(workdir_json.saved_config(workdir) or {})) != 'electra':
    return hf.export(inference.load(workdir), out)
  config, params, tok, _ = inference.load_run(workdir)
  return electra.export_electra(params, config.model, config.objective, tok, out)


def _sweep(args: list[str]) -> int:
  from mlm_flax import sweep  # pylint: disable=g-import-not-at-top
  spec = _config_spec(sys.argv)
  if spec is None and FLAGS.command != 'train':
    raise ValueError(f'sweep --command {FLAGS.command} needs --config FILE (the config the points share).')
  spec = spec or DEFAULT_CONFIG
  points = sweep.grid(FLAGS.sweep, FLAGS.seeds) if FLAGS.sweep or FLAGS.seeds else []
  for key in sorted({k for p in points for k in p}):
    _check_key(FLAGS.config, key, 'swept')
  home = FLAGS.find_module_defining_flag('workdir')  # this module, under whatever name it runs
  ours = {n for n in FLAGS if FLAGS.find_module_defining_flag(n) == home}
  passed = [FLAGS[n].serialize() for n in sorted(ours) if FLAGS[n].present and n not in SWEEP_FLAGS]
  overrides = [a for a in sys.argv if a.startswith('--config.')]
  plan = sweep.make_sweep(FLAGS.command, spec, FLAGS.sweep, FLAGS.seeds, overrides, passed + args)
  root = FLAGS.workdir or default_workdir(spec, {}) + '-sweep'
  return sweep.run(plan, root, dry_run=FLAGS.dry_run, emit_kind=FLAGS.emit)


COMMANDS = {'train': _train, 'eval': _eval, 'fill-mask': _fill_mask, 'classify': _classify, 'answer': _answer,
            'export': _export_command, 'import': _import, 'plot': _plot, 'finetune': _finetune,
            'sweep': lambda args: sys.exit(_sweep(args)), 'compare': _compare}  # command -> its function of the remaining (non-flag) arguments


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: mlm-flax {{{"|".join(COMMANDS)}}} [flags]; see README.md')
  try:
    _run(argv[1], argv[2:])
  except (ValueError, OSError, KeyError, FloatingPointError) as e:  # OSError: save failed, workdir locked
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_mlm_flax_config', path)
  if module_spec is None or not os.path.isfile(path):
    raise ValueError(f'--config={spec}: no such config file.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (AttributeError, KeyError) as e:  # a locked ConfigDict refuses keys it does not have
    match = re.search(r'Key "(\w+)" does not exist', str(e))
    hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', str(e))
    if not match:
      raise
    raise ValueError(f'{path} sets config key {match.group(1)!r}, which does not exist (see '
                     f'configs/default.py for every key).{" " + hint.group(0) if hint else ""}') from None


def _config_spec(argv: list[str]) -> str | None:
  """The `--config` value on the command line (FILE or FILE:ARG); None when not given."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  return spec


def _check_key(config: ml_collections.ConfigDict, key: str, what: str = 'unknown') -> None:
  """Raises ValueError when `key` (dotted) is not in `config`, listing the valid keys at that level."""
  node, done = config, []
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(['config'] + done)
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, valid, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      name = f'--config.{key}' if what == 'unknown' else key
      raise ValueError(f'{what} config key {name}: {where} has no {part!r}.{hint} '
                       f'Valid keys of {where}: {", ".join(valid)}')
    node = node[part]
    done.append(part)


def check_overrides(argv: list[str]) -> None:
  """Fails fast on `--config.KEY=...` naming no key, listing the valid keys at that level."""
  spec = _config_spec(argv)
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if not overrides and spec is None:
    return
  config = _load_config_file(spec or _default_config(argv))  # a bad config file fails here, in one line
  for key in overrides:
    _check_key(config, key)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run() -> None:
  """Console-script entry point."""
  try:
    check_overrides(sys.argv)
  except (ValueError, AttributeError, KeyError, TypeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  define_flags(sys.argv)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
