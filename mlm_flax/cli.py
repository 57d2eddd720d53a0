"""`mlm-flax` command line: train | eval | fill-mask | classify | export | import | plot.

  mlm-flax train [--config configs/tiny.py] [--workdir DIR] [--config.KEY=VALUE ...]
  mlm-flax eval --workdir DIR [--split validation]
  mlm-flax fill-mask --model DIR [--top_k 5] [--targets a,b] [--dtype float32] TEXT ...
  mlm-flax classify --model DIR [--top_k K] [--dtype float32] TEXT ...
  mlm-flax export --workdir DIR --out HF_DIR
  mlm-flax import --hf HF_DIR --workdir DIR
  mlm-flax finetune --init MODEL --workdir DIR [--config configs/finetune.py] [--config.KEY=VALUE ...]
  mlm-flax plot --workdir DIR[,DIR2,...] [--out PNG]
"""

import difflib
import hashlib
import importlib.util
import json
import os
import re
import sys
from typing import Any

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from mlm_flax import configs

COMMANDS = ('train', 'eval', 'fill-mask', 'classify', 'export', 'import', 'plot', 'finetune')
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
  flags.DEFINE_string('model', None, 'Workdir or Hugging Face folder to load (fill-mask, classify).')
  flags.DEFINE_integer('top_k', 5, 'Predictions per mask (fill-mask, default 5); labels per text (classify; '
                       'default: the best label only, as pipeline("text-classification")).')
  flags.DEFINE_list('targets', None, 'Restrict fill-mask scoring to these words (fill-mask).')
  flags.DEFINE_string('dtype', None, 'Compute dtype (fill-mask, classify): float32 (default; answers as transformers), '
                      'bfloat16, float16 or auto (as training: bf16 on GPU/TPU/AMX CPUs).')
  flags.DEFINE_string('out', None, 'Hugging Face folder to write (export); PNG to write (plot).')
  flags.DEFINE_string('hf', None, 'Hugging Face model folder or hub name to import (import).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
  flags.DEFINE_integer('process_id', None, 'This process (multi-host).')


def default_workdir(config_file: str, overrides: dict[str, Any]) -> str:
  """`workdirs/<config name>`, plus a suffix naming the `--config.KEY=VALUE` overrides, so runs with other
  overrides get other folders: sorted (any order gives the same folder), filesystem-safe, and a readable
  prefix plus a hash of the whole when long or when characters had to be replaced, e.g.
  `workdirs/tiny-batch_size=32+optimizer.learning_rate=0.0003`."""
  name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  if not overrides:
    return os.path.join('workdirs', name)
  raw = '+'.join(f'{k}={v}' for k, v in sorted(overrides.items()))  # no ',': `plot --workdir a,b`
  suffix = re.sub(r'[^A-Za-z0-9._=+-]', '_', raw)
  if suffix != raw or len(suffix) > 80:  # replaced characters or cut: a hash keeps the names distinct
    suffix = f'{suffix[:60]}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}'
  return os.path.join('workdirs', f'{name}-{suffix}')


def _run(command: str, args: list[str]) -> None:
  if FLAGS.dtype is not None and command not in ('fill-mask', 'classify'):
    hint = ('set --config.model.dtype=... instead' if command in ('train', 'finetune')
            else 'eval and export compute in float32')
    raise ValueError(f'--dtype is a fill-mask and classify flag; {command} does not take it ({hint}).')
  if command == 'plot':  # no JAX needed
    from mlm_flax import plot  # pylint: disable=g-import-not-at-top
    if not FLAGS.workdir:
      raise ValueError('usage: mlm-flax plot --workdir DIR[,DIR2,...] [--out PNG]')
    print(json.dumps({'plot': plot.plot_runs(FLAGS.workdir.split(','), FLAGS.out)}))
    return
  if command == 'train':  # a bad config fails in a second, before the heavy imports and any data work
    import jax  # pylint: disable=g-import-not-at-top
    from mlm_flax import parallel, validation  # pylint: disable=g-import-not-at-top
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    overrides = config_flags.get_override_values(FLAGS['config'])
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']), overrides)
    config = validation.adopt_imported(FLAGS.config, workdir, set_keys=overrides)
    validation.validate_config(config, jax.device_count(), jax.process_count())
    if jax.process_index() == 0:
      print(f'Workdir: {workdir}', flush=True)
  if command == 'finetune':  # a bad config fails in a second, before the model and the data are loaded
    import jax  # pylint: disable=g-import-not-at-top
    from mlm_flax import finetune, parallel  # pylint: disable=g-import-not-at-top
    if not FLAGS.init or not FLAGS.workdir:
      raise ValueError('usage: mlm-flax finetune --init MODEL --workdir DIR [--config configs/finetune.py] '
                       '[--config.KEY=VALUE ...]')
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    finetune.validate(FLAGS.config, jax.device_count(), jax.process_count())
    print(json.dumps(finetune.finetune(FLAGS.config, FLAGS.init, FLAGS.workdir)))
    return
  from mlm_flax import evaluate, inference, parallel, train  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
  if command == 'train':
    result = train.train_and_evaluate(config, workdir)
    print(json.dumps(result))
  elif command == 'eval':
    if not FLAGS.workdir:
      raise ValueError('eval needs --workdir DIR (a folder written by `mlm-flax train`).')
    print(json.dumps(evaluate.evaluate_workdir(FLAGS.workdir, FLAGS.split)))
  elif command == 'fill-mask':
    if not FLAGS.model or not args:
      raise ValueError('usage: mlm-flax fill-mask --model DIR [--top_k 5] "text with a [MASK]" ...')
    mlm = inference.load(FLAGS.model, dtype=FLAGS.dtype)
    print(json.dumps(inference.fill_mask(mlm, args[0] if len(args) == 1 else args, top_k=FLAGS.top_k,
                                         targets=FLAGS.targets), indent=1))
  elif command == 'classify':
    if not FLAGS.model or not args:
      raise ValueError('usage: mlm-flax classify --model DIR [--top_k K] "text" ... (DIR: a fine-tuned workdir or a '
                       'Hugging Face *ForSequenceClassification / *ForTokenClassification folder)')
    clf = inference.load_classifier(FLAGS.model, dtype=FLAGS.dtype)
    top_k = {'top_k': FLAGS.top_k} if FLAGS['top_k'].present else {}
    print(json.dumps(inference.classify(clf, args[0] if len(args) == 1 else args, **top_k), indent=1))
  elif command == 'export':
    if not FLAGS.workdir or not FLAGS.out:
      raise ValueError('usage: mlm-flax export --workdir DIR --out HF_DIR')
    load = inference.load_classifier if inference.is_task_model(FLAGS.workdir) else inference.load
    hf.export(load(FLAGS.workdir), FLAGS.out)
    print(json.dumps({'exported': FLAGS.out}))
  elif command == 'import':
    if not FLAGS.hf or not FLAGS.workdir:
      raise ValueError('usage: mlm-flax import --hf HF_DIR --workdir DIR')
    print(json.dumps(hf.import_to_workdir(FLAGS.hf, FLAGS.workdir)))


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


def check_overrides(argv: list[str]) -> None:
  """Fails fast on `--config.KEY=...` naming no key, listing the valid keys at that level."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if not overrides and spec is None:
    return
  config = _load_config_file(spec or _default_config(argv))  # a bad config file fails here, in one line
  for key in overrides:
    node, done = config, []
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(['config'] + done)
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f' Did you mean {close[0]!r}?' if close else ''
        raise ValueError(f'unknown config key --config.{key}: {where} has no {part!r}.{hint} '
                         f'Valid keys of {where}: {", ".join(valid)}')
      node = node[part]
      done.append(part)


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
