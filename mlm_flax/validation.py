"""Config checks that run before any data is read or anything compiles: a mistyped config fails in a
second with a message naming the key and the fix, not after an hour of corpus building and compiling.

`validate_config` needs only the config and the device count; `check_resume` compares the model with
the one a workdir was trained with. Checks that need the tokenizer (vocab size) live in
`train.resolve_config`, which runs right after the tokenizer is loaded.
"""

import difflib
import json
import math
import os

import ml_collections

CHOICES = {
    'model.type': ('bert', 'roberta', 'modernbert'),
    'model.norm_position': ('post', 'pre'),
    'model.hidden_act': ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu'),
    'model.dtype': ('auto', 'float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'optimizer.schedule': ('linear', 'cosine', 'constant'),
    'optimizer.nonfinite': ('skip', 'stop'),
    'model.attention': ('auto', 'einsum', 'dot_product_attention'),
}
# Model keys that change how the same params are computed, not the params: free to change on resume.
COMPUTE_ONLY = ('dtype', 'attention', 'remat', 'vocab_multiple')
POSITIVE = ('num_train_steps', 'batch_size', 'eval_batch_size', 'max_seq_length', 'log_every_steps',
            'eval_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep', 'model.num_layers',
            'model.hidden_size', 'model.num_heads', 'model.intermediate_size',
            'model.max_position_embeddings', 'model.vocab_multiple', 'data.tokenizer_vocab_size', 'data.num_proc', 'fsdp',
            'grad_accum_steps')
FRACTIONS = ('masking.rate', 'masking.eval_rate', 'masking.mask_prob', 'masking.random_prob',
             'data.validation_fraction')  # in [0, 1]; rates in (0, 1]


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    node = node.get(part) if node is not None else None
  return node


def validate_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ValueError naming the first bad key (and how to fix it)."""
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
  m = config.masking
  if m.mask_prob + m.random_prob > 1.0:
    raise ValueError(f'masking.mask_prob + masking.random_prob = {m.mask_prob + m.random_prob} exceeds 1; '
                     'lower one (the rest of the masked tokens stay unchanged).')
  if config.optimizer.learning_rate < 0 or config.optimizer.warmup_steps < 0:
    raise ValueError('--config.optimizer.learning_rate and --config.optimizer.warmup_steps must be >= 0.')
  if config.model.hidden_size % config.model.num_heads:
    raise ValueError(f'model.hidden_size={config.model.hidden_size} is not divisible by model.num_heads='
                     f'{config.model.num_heads}; pick num_heads dividing hidden_size (e.g. hidden_size/64).')
  if config.model.type == 'modernbert':  # layer types, window, RoPE head size
    from mlm_flax.models import modernbert  # pylint: disable=g-import-not-at-top
    modernbert.check_config(config.model)
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


def model_changes(old: dict, new: dict, set_in_both: bool = False) -> dict:
  """{key: (old, new)} of the model keys that differ, except COMPUTE_ONLY ones; `set_in_both`: only
  keys that `new` sets and `old` has. A key `old` lacks (added to the config after that run) counts as
  its default, so older workdirs still resume."""
  from configs import default  # pylint: disable=g-import-not-at-top
  defaults = default.get_config().model.to_dict()
  before = lambda k: old[k] if k in old else defaults.get(k)
  return {k: (before(k), v) for k, v in new.items() if before(k) != v and k not in COMPUTE_ONLY
          and (not set_in_both or (v is not None and k in old))}


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses early to continue a workdir's run with a different model (keys the config sets)."""
  path = os.path.join(workdir, 'config.json')
  checkpoints = os.path.join(workdir, 'checkpoints')
  trained = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  if not os.path.isfile(path) or (not trained and os.path.isdir(os.path.join(workdir, 'imported'))):
    return  # nothing to resume, or imported weights whose model config `train` adopts
  with open(path) as f:
    old = json.load(f).get('model', {})
  diff = model_changes(old, config.model.to_dict(), set_in_both=True)
  if diff:
    keys = ' '.join(f'--config.model.{k}={o}' for k, (o, _) in diff.items())
    raise ValueError(f'{workdir} holds a run with a different model config {diff} (old, new); use a new '
                     f'--workdir, or resume with the old model settings ({keys}).')
