"""Config checks that run before any data is read or anything compiles: a mistyped config fails in a
second with a message naming the key and the fix, not after an hour of corpus building and compiling.

`validate_config` needs only the config and the device count; `check_resume` compares the whole config
with the one a workdir's run was saved with (`FREE_TO_CHANGE` lists the keys a resumed run may change);
`adopt_imported` takes a workdir's imported model architecture. Checks that need the tokenizer (vocab
size) live in `train.resolve_config`, which runs right after the tokenizer is loaded.
"""

import difflib
import importlib.util
import json
import math
import os
from typing import Iterable

import ml_collections

from mlm_flax import models, workdir_json
from mlm_flax.objectives import OBJECTIVES
from mlm_flax.models import config as model_config

CHOICES = {
    'model.type': tuple(models.ARCHITECTURES),
    'model.norm_position': ('post', 'pre'),
    'model.mlp': ('gelu', 'geglu', 'swiglu'),
    'model.norm': ('layernorm', 'rmsnorm'),
    'model.positions': ('learned', 'rope'),
    'model.hidden_act': ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu'),
    'model.dtype': ('auto', 'float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    # Copies of optim.SCHEDULES, optim.DECAY_SHAPES and optim.OPTIMIZERS (optim imports JAX).
    'optimizer.schedule': ('linear', 'cosine', 'constant', 'wsd'),
    'optimizer.decay_shape': ('linear', '1-sqrt'),
    'optimizer.type': ('adamw', 'stable_adamw'),
    'optimizer.nonfinite': ('skip', 'stop'),
    'objective.type': tuple(OBJECTIVES),
    'model.attention': ('auto', 'einsum', 'dot_product_attention'),
    # Copies of masking.STRATEGIES, masking.RATE_SCHEDULES, data.PACKING_MODES and data.tokenizer.TOKENIZER_TYPES
    # (those modules import JAX, datasets, transformers; tests/test_resume_config.py checks the copies are equal).
    'masking.strategy': ('token', 'whole_word', 'span'),
    'masking.rate_schedule': ('constant', 'linear', 'cosine', 'step'),
    'data.packing': ('documents', 'group_texts', 'line_by_line'),
    'data.tokenizer_type': ('wordpiece', 'bpe'),
}
# Model keys that change how the same params are computed, not the params: free to change on resume.
COMPUTE_ONLY = ('dtype', 'attention', 'remat', 'vocab_multiple')
# Keys whose change leaves a run's maths (params, optimizer, data order, masks) as they were: a resumed
# run may change them, and a sweep or a fine-tuning run may vary them without making another run. Logging
# and progress, eval cadence and size (eval results do not depend on the eval batch size), checkpoint
# cadence and retention, input-pipeline knobs, compute-only model keys, the FSDP layout (same maths,
# other sharding), and what a non-finite step does (the applied steps are the same).
FREE_TO_CHANGE = ('log_every_steps', 'progress_bar', 'fill_mask_examples', 'eval_every_steps', 'eval_batch_size',
                  'max_eval_batches', 'checkpoint_every_steps', 'max_checkpoints_to_keep', 'fsdp',
                  'optimizer.nonfinite', 'data.prefetch', 'data.num_proc', 'data.cache_dir', 'logging.wandb',
                  'logging.wandb_project', *(f'model.{k}' for k in COMPUTE_ONLY))
# Model keys that do not change the params' shapes or meaning: a run on imported weights takes them from
# its config; every other model key (the architecture) comes from the import.
IMPORT_FROM_CONFIG = (*COMPUTE_ONLY, 'hidden_dropout', 'attention_dropout')
# Keys filled from the tokenizer when unset: a config that leaves them None matches any saved value.
FROM_TOKENIZER = ('model.vocab_size', 'model.pad_token_id')
POSITIVE = ('num_train_steps', 'batch_size', 'eval_batch_size', 'max_seq_length', 'log_every_steps',
            'eval_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep', 'model.num_layers',
            'model.hidden_size', 'model.num_heads', 'model.intermediate_size',
            'model.max_position_embeddings', 'model.vocab_multiple', 'data.tokenizer_vocab_size', 'data.num_proc', 'fsdp',
            'grad_accum_steps')
WANDB_MISSING = ('--config.logging.wandb=True needs Weights & Biases, which is not installed: pip install -e '
                 '".[wandb]" (or pip install wandb), or set --config.logging.wandb=False.')
FRACTIONS = ('masking.rate', 'masking.eval_rate', 'masking.final_rate', 'masking.mask_prob', 'masking.random_prob',
             'data.validation_fraction', 'optimizer.decay_fraction', 'objective.generator_hidden_fraction',
             'objective.generator_layers_fraction')  # in [0, 1]; rates in (0, 1]


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    node = node.get(part) if node is not None else None
  return node


def parse_phases(spec: str, key: str) -> list[tuple[int, int]]:
  """'VALUE:STEPS,VALUE:STEPS,...' (a warm-up: VALUE for STEPS steps, in order) → [(value, steps)]; '' → []."""
  phases = []
  for part in filter(None, (p.strip() for p in (spec or '').split(','))):
    value, _, steps = part.partition(':')
    try:
      phases.append((int(value), int(steps)))
    except ValueError:
      raise ValueError(f"--config.{key}={spec!r} is not a list of VALUE:STEPS phases; write e.g. "
                       f"--config.{key}='32:200,64:200' (32 for 200 steps, then 64 for 200).") from None
  return phases


def _check_warmup(config: ml_collections.ConfigDict, key: str, full_key: str, lowest: int) -> None:
  """A warm-up's phases: values increasing from `lowest` up to below the full value, each for >= 1 step."""
  phases, full = parse_phases(config.get(key, ''), key), config[full_key]
  values = [v for v, _ in phases]
  if any(n < 1 for _, n in phases) or values != sorted(set(values)) or any(not lowest <= v < full for v in values):
    raise ValueError(f'--config.{key}={config.get(key)!r}: each VALUE:STEPS phase needs STEPS >= 1 and values '
                     f'increasing, at least {lowest} and below {full_key}={full} (the value after the warm-up); '
                     f"e.g. --config.{key}='{max(lowest, full // 4)}:100,{max(lowest, full // 2)}:100'.")
  if phases and config.data.streaming:
    raise ValueError(f'--config.{key} needs packed (non-streaming) data; set --config.data.streaming=false or '
                     f"drop the warm-up (--config.{key}='').")


def validate_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ValueError naming the first bad key (and how to fix it)."""
  _check_values(config)
  _check_model(config)
  _check_batches(config, num_devices, num_processes)


def _check_values(config: ml_collections.ConfigDict) -> None:
  """Each key on its own: choices, counts, fractions, dtypes, masking and warm-up specs, the optimizer."""
  for key, valid in CHOICES.items():
    value = _get(config, key)
    if value is not None and value not in valid:
      close = difflib.get_close_matches(str(value), valid, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'--config.{key}={value!r} is not one of {", ".join(valid)}.{hint}')
  for key in POSITIVE:
    value = _get(config, key)
    if value is not None and value < 1:
      raise ValueError(f'--config.{key}={value} must be at least 1.')
  for key in FRACTIONS:
    value = _get(config, key)
    lowest_ok = 0.0 if key in ('data.validation_fraction', 'masking.mask_prob', 'masking.random_prob') else 1e-9
    if value is not None and not lowest_ok <= value <= 1.0:
      raise ValueError(f'--config.{key}={value} must be a fraction in {"[0" if lowest_ok == 0 else "(0"}, 1].')
  if config.model.dtype == 'float16':
    raise ValueError("--config.model.dtype='float16' is not supported: the train step has no loss scaling, so "
                     "float16 gradients underflow to zero and activations overflow; use --config.model.dtype="
                     "bfloat16 (float32's range, the same speed on GPU/TPU) with model.param_dtype=float32.")
  if config.model.param_dtype != 'float32':
    raise ValueError(f'--config.model.param_dtype={config.model.param_dtype!r} keeps the AdamW master weights in '
                     '16 bits: updates smaller than ~1/256 of a weight round away and training stalls; use '
                     '--config.model.param_dtype=float32 and get 16-bit compute from --config.model.dtype=bfloat16.')
  m = config.masking
  if m.mask_prob + m.random_prob > 1.0:
    raise ValueError(f'masking.mask_prob + masking.random_prob = {m.mask_prob + m.random_prob} exceeds 1; '
                     'lower one (the rest of the masked tokens stay unchanged).')
  if m.get('rate_schedule', 'constant') != 'constant' and m.get('final_rate') is None:
    raise ValueError(f'--config.masking.rate_schedule={m.rate_schedule!r} goes from masking.rate to '
                     'masking.final_rate, which is unset; set it (e.g. --config.masking.final_rate=0.15) or use '
                     '--config.masking.rate_schedule=constant.')
  if m.get('schedule_steps', 0) < 0:
    raise ValueError(f'--config.masking.schedule_steps={m.schedule_steps} must be >= 0 (0: the whole run).')
  _check_warmup(config, 'seq_len_warmup', 'max_seq_length', 3)
  _check_warmup(config, 'batch_size_warmup', 'batch_size', 1)
  if config.optimizer.learning_rate < 0 or config.optimizer.warmup_steps < 0:
    raise ValueError('--config.optimizer.learning_rate and --config.optimizer.warmup_steps must be >= 0.')
  if config.get('logging') is not None and config.logging.get('wandb'):
    if importlib.util.find_spec('wandb') is None:
      raise ValueError(WANDB_MISSING)
  if config.get('init_from') is not None:
    parse_init_from(config.init_from)


def _check_model(config: ml_collections.ConfigDict) -> None:
  """The architecture's own checks, the objective it serves, the vocabulary and the positions."""
  if config.model.hidden_size % config.model.num_heads:
    raise ValueError(f'model.hidden_size={config.model.hidden_size} is not divisible by model.num_heads='
                     f'{config.model.num_heads}; pick num_heads dividing hidden_size (e.g. hidden_size/64).')
  models.architecture(config.model.type).check_config(models.ModelConfig.from_dict(config.model))
  if config.model.vocab_size is not None and config.model.vocab_size < 1:
    raise ValueError(f'--config.model.vocab_size={config.model.vocab_size} must be positive (or unset).')
  offset = 0
  if config.model.type == 'roberta':  # positions start after the pad id (exact once the tokenizer is known)
    offset = (config.model.pad_token_id or 0) + 1
  if config.max_seq_length + offset > config.model.max_position_embeddings:
    raise ValueError(f'max_seq_length={config.max_seq_length} exceeds the model\'s '
                     f'{config.model.max_position_embeddings - offset} positions (model.max_position_embeddings='
                     f'{config.model.max_position_embeddings}); lower max_seq_length or raise '
                     'model.max_position_embeddings.')


def _check_batches(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """Batch sizes (and their warm-up phases) against the devices, processes, FSDP and grad accumulation."""
  if num_devices % config.get('fsdp', 1):
    raise ValueError(f'--config.fsdp={config.fsdp} must divide the {num_devices} devices; use a divisor of '
                     f'{num_devices} (1 = plain data parallelism).')
  accum = config.get('grad_accum_steps', 1)
  if accum > 1 and config.batch_size % (accum * num_devices):
    raise ValueError(f'batch_size={config.batch_size} must split into grad_accum_steps={accum} micro-batches '
                     f'of a multiple of the {num_devices} devices; use a batch_size that is a multiple of '
                     f'{accum * num_devices}, or fewer grad_accum_steps.')
  for key in ('batch_size', 'eval_batch_size'):
    size = config[key]
    if size % num_devices or size % num_processes:
      multiple = math.lcm(num_devices, num_processes)
      raise ValueError(f'{key}={size} must be divisible by the {num_devices} devices of the data axis and the '
                       f'{num_processes} processes; use a multiple of {multiple} (e.g. '
                       f'--config.{key}={max(multiple, size // multiple * multiple)}).')
  multiple = math.lcm(accum * num_devices, num_processes)
  for size, _ in parse_phases(config.get('batch_size_warmup', ''), 'batch_size_warmup'):
    if size % multiple:
      raise ValueError(f'--config.batch_size_warmup={config.batch_size_warmup!r}: batch size {size} must be a '
                       f'multiple of {multiple} (the {num_devices} devices x grad_accum_steps={accum}, and the '
                       f'{num_processes} processes); use multiples of {multiple}.')


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """`init_from` 'WORKDIR' or 'WORKDIR:STEP' -> (workdir, step or None for its latest checkpoint)."""
  workdir, _, step = spec.rpartition(':')
  if not (workdir and step.isdigit()):
    workdir, step = spec, None
  if not workdir:
    raise ValueError(f'--config.init_from={spec!r} names no workdir; use WORKDIR or WORKDIR:STEP.')
  return workdir, None if step is None else int(step)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'model.hidden_size': 256, ...} from nested dicts (a config's `to_dict()` or a config.json)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _with_resolved_switches(config: dict) -> dict:
  if not isinstance(config.get('model'), dict):
    return config
  return {**config, 'model': {**config['model'], **model_config.resolved_switches(config['model'])}}


def config_changes(old: dict, new: dict) -> dict:
  """{key: (old, new)} of the (dotted) keys whose values differ, except FREE_TO_CHANGE ones.

  Keys absent from either config (a config.json written by an older version) are not compared, nor
  FROM_TOKENIZER keys that `new` leaves unset (they are filled from the workdir's tokenizer), nor model keys
  the architecture of both never reads (`local_attention` of a BERT). The architecture switches compare as
  resolved (None is the architecture's own value: unset equals that value set; a config from before a switch
  existed had its own value), and are reported as written.
  """
  new = json.loads(json.dumps(new))  # JSON: tuples as lists, like config.json
  unused = _unused_model_keys(old, new)
  old_raw, new_raw = flatten(old), flatten(new)
  old, new = flatten(_with_resolved_switches(old)), flatten(_with_resolved_switches(new))
  return {k: (old_raw.get(k, old[k]), new_raw.get(k, v)) for k, v in new.items()
          if k in old and old[k] != v and k not in FREE_TO_CHANGE and not (v is None and k in FROM_TOKENIZER)
          and k not in unused}


def _unused_model_keys(old: dict, new: dict) -> set[str]:
  """`model.KEY` of the keys neither config's architecture reads (`model_config.unused_keys`)."""
  models = [c.get('model') for c in (old, new)]
  if not all(isinstance(m, dict) for m in models):
    return set()
  both = set(model_config.unused_keys(models[0])) & set(model_config.unused_keys(models[1]))
  return {f'model.{k}' for k in both}


def check_config_change(old: dict, new: dict, workdir: str) -> str | None:
  """Refuses (ValueError naming each key, old and new values, and the fix) to continue the run saved
  with config `old` in `workdir` under config `new` if that changes the run's maths.

  A changed `num_train_steps` is allowed ("train longer"); the returned warning says what it does to the
  learning-rate schedule. None when nothing that matters changed.
  """
  diff = config_changes(old, new)
  steps = diff.pop('num_train_steps', None)
  if diff:
    changes = ', '.join(f'{k}: {o!r} -> {n!r}' for k, (o, n) in diff.items())
    keep = ' '.join(f'--config.{k}={o}' for k, (o, _) in diff.items())
    raise ValueError(f'{workdir} holds a run whose config differs in keys that change its maths ({changes}; '
                     f'old -> new), so it cannot resume with them; use a new --workdir, or pass the old values '
                     f'({keep}).')
  if steps is None:
    return None
  opt = flatten(new)
  if opt.get('optimizer.schedule') == 'wsd':
    start = steps[0] - min(int(round(opt.get('optimizer.decay_fraction', 0.1) * steps[0])),
                           steps[0] - min(opt['optimizer.warmup_steps'], steps[0]))
    return (f'note: num_train_steps changed from {steps[0]} to {steps[1]}. With the warmup-stable-decay schedule '
            f'the learning rate stays at its peak until the cool-down (the old run\'s began after step {start}): '
            f'resumed from a checkpoint at or before step {start}, this is the run that had num_train_steps='
            f'{steps[1]} from the start; from a later one, its cool-down is cut short and restarts at the peak.')
  decay = ('constant' if opt['optimizer.schedule'] == 'constant' else
           f"{opt['optimizer.schedule']} decay to {opt['optimizer.end_learning_rate_factor']} x learning_rate")
  return (f'warning: num_train_steps changed from {steps[0]} to {steps[1]}. The learning-rate schedule '
          f"({opt['optimizer.warmup_steps']} warmup steps, then {decay} at step {steps[1]}) is rebuilt for "
          f'{steps[1]} steps: the steps from the checkpoint on follow the new schedule (the learning rate '
          'jumps to its value at that step), the steps already taken followed the old one, so the result is '
          f'not that of a run started with num_train_steps={steps[1]} (use a new --workdir for that).')


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Refuses early (before any data is read) to continue a workdir's run with a config that changes its
  maths; returns `check_config_change`'s warning, if any."""
  old = workdir_json.saved_config(workdir)
  return None if old is None else check_config_change(old, config.to_dict(), workdir)


def adopt_imported(config: ml_collections.ConfigDict, workdir: str,
                   set_keys: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """For a workdir started by `mlm-flax import`: `config` with the imported model's architecture (every
  model key but IMPORT_FROM_CONFIG, which stay the config's); `config` itself for other workdirs.

  `set_keys` (dotted, e.g. the command line's overrides) are keys the user chose: one that sets an
  architecture key to another value than the import's is refused (ValueError), not silently replaced.
  """
  saved = workdir_json.read_config(workdir)
  if not os.path.isdir(os.path.join(workdir, 'imported')) or saved is None:
    return config
  imported = {k: v for k, v in model_config.upgraded(saved['model']).items() if k not in IMPORT_FROM_CONFIG}
  conflicts = {k: (imported[k[6:]], _get(config, k)) for k in set_keys
               if k.startswith('model.') and k[6:] in imported and imported[k[6:]] != _get(config, k)}
  if conflicts:
    changes = ', '.join(f'{k}: {o!r} -> {n!r}' for k, (o, n) in conflicts.items())
    raise ValueError(f'{workdir} holds imported weights whose architecture these settings would change '
                     f'({changes}; imported -> given); drop them (the architecture comes from the import; '
                     f'only {", ".join(IMPORT_FROM_CONFIG)} can be set), or train a new model in another '
                     '--workdir.')
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update({k: v for k, v in imported.items() if k in config.model})
  return config
