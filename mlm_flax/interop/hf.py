"""Hugging Face interop: masked-LM and task-model checkpoints and configs in and out of our params pytrees.

`load_hf` reads a Hugging Face folder (or hub name) into (config, params, tokenizer, module); `load_hf_task` reads
it for a task model (encoder, task head, labels); `export` writes a masked LM or a task model
(`*For{Sequence,Token}Classification`, `*ForQuestionAnswering`); `import_to_workdir` starts a workdir from one.
The mapping of each architecture (key map, head key map, config.json conversion, tied decoder) is its own module
(`bert.py` for BERT, RoBERTa and ELECTRA, `modernbert.py`), chosen by the model type through `MAPPINGS`.
"""

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax import workdir_json
from mlm_flax.interop import bert, modernbert, tree_get, tree_set
from mlm_flax.models import make_model, position_offset

# Hugging Face `model_type` / our `model.type` -> the module mapping that architecture (key map, configs).
MAPPINGS = {'bert': bert, 'roberta': bert, 'electra': bert, 'modernbert': modernbert}


def _mapping(model_type: str):
  if model_type not in MAPPINGS:
    raise ValueError(f"model_type {model_type!r} is not supported; use a BERT, RoBERTa, ELECTRA or ModernBERT "
                     "checkpoint.")
  return MAPPINGS[model_type]


def model_config_from_hf(hf: dict) -> dict:
  """Our `model` config values from a Hugging Face config.json."""
  return _mapping(hf.get('model_type', 'bert')).model_config_from_hf(hf)


def hf_config_from_model(model: ml_collections.ConfigDict, tok) -> dict:
  """A Hugging Face config.json for our `model` config."""
  return _mapping(model['type']).hf_config_from_model(model, tok)


def decoder_is_tied(state: dict[str, np.ndarray], model: dict) -> bool:
  """Whether the checkpoint's MLM decoder is its word embeddings (see the architecture's mapping)."""
  return _mapping(model['type']).decoder_is_tied(state, model)


def params_from_state_dict(state: dict[str, np.ndarray], model: dict, init_params: Any) -> tuple[dict, list[str]]:
  """Our params from a HF state dict, and the params initialised fresh (from `init_params`: a missing head)."""
  return _mapping(model['type']).params_from_state_dict(state, model, init_params)


def state_dict_from_params(params: Any, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A HF `*ForMaskedLM` state dict in f32."""
  return _mapping(model['type']).state_dict_from_params(params, model)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Weights of a HF model folder: model.safetensors, else pytorch_model.bin (needs torch)."""
  safetensors_path = os.path.join(path, 'model.safetensors')
  if os.path.isfile(safetensors_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(safetensors_path)
  bin_path = os.path.join(path, 'pytorch_model.bin')
  if os.path.isfile(bin_path):
    import torch  # pylint: disable=g-import-not-at-top
    return {k: v.float().numpy() for k, v in torch.load(bin_path, map_location='cpu', weights_only=True).items()}
  raise FileNotFoundError(f'{path} has neither model.safetensors nor pytorch_model.bin.')


def log_fresh_head(fresh: list[str], path: str) -> None:
  if fresh:
    logging.warning('%s has no MLM head (%s): the head is initialised fresh; fine-tune or continue '
                    'pretraining before using fill-mask.', path, ', '.join(fresh))


def read_hf_config(path: str) -> dict:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def is_hf_folder(path: str) -> bool:
  """Whether `path` is a Hugging Face model folder (a config.json with a `model_type`)."""
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    return False
  with open(config_path) as f:
    return 'model_type' in json.load(f)


def looks_like_hub_name(path: str) -> bool:
  """'name' or 'org/name': what loading tries on the Hugging Face hub when no such local path exists."""
  return not path.startswith(('/', '.', '~')) and path.count('/') <= 1


def resolve(path: str | os.PathLike) -> str:
  """A local folder: `path` itself, or the hub snapshot of a hub name (where the network allows)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=['*.json', '*.safetensors', '*.txt'])
  except Exception as e:  # offline, unknown name, ...
    raise FileNotFoundError(f'{path!r} is neither a local folder nor a reachable Hugging Face hub model '
                            f'({type(e).__name__}); pass a workdir or a local model folder.') from e


def _config_and_params(path: str, state: dict[str, np.ndarray], dtype: str,
                       zero_head: bool = False) -> tuple[ml_collections.ConfigDict, Any, list[str]]:
  """The run config of a HF folder, our masked-LM params from `state` and the params initialised fresh
  (`zero_head`: zeros, not a random init, for callers that drop the MLM head: no init to compile)."""
  from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(model_config_from_hf(read_hf_config(path)), dtype=dtype)
  config.model.tie_word_embeddings = decoder_is_tied(state, config.model.to_dict())
  config.max_seq_length = min(512, config.model.max_position_embeddings - position_offset(config.model))
  config.data.tokenizer = os.path.abspath(path)
  model = make_model(config.model)
  init = functools.partial(model.init, jax.random.PRNGKey(config.seed), jnp.zeros((1, 8), jnp.int32),
                           jnp.ones((1, 8), jnp.int32))
  init_params = (jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(init)) if zero_head
                 else init())['params']
  params, fresh = params_from_state_dict(state, config.model.to_dict(), init_params)
  return config, params, fresh


def load_hf(path: str | os.PathLike, dtype: str = 'float32') -> tuple[ml_collections.ConfigDict, Any, Any, Any]:
  """(config, params, tokenizer, module) of a Hugging Face BERT/RoBERTa/ELECTRA/ModernBERT masked LM (or
  encoder-only model: fresh head, with a warning), computing in `dtype`; `inference.load` wraps them in an `MLM`."""
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = resolve(path)
  config, params, fresh = _config_and_params(path, read_state_dict(path), dtype)
  log_fresh_head(fresh, path)
  tok = tokenizer_lib.load_tokenizer(path)
  return config, jax.tree.map(jnp.asarray, params), tok, make_model(config.model)


# The Hugging Face class name's ending -> our task (a sequence head with one output and no problem_type, or
# problem_type 'regression', is a regression).
TASK_SUFFIXES = {'ForSequenceClassification': 'classification', 'ForTokenClassification': 'token_classification',
                 'ForQuestionAnswering': 'question_answering'}
QA_LABELS = ['LABEL_0', 'LABEL_1']  # a `*ForQuestionAnswering`'s two outputs (start, end): HF's default names


def task_info(hf: dict) -> dict:
  """What a HF config.json says of its task head: `task` (None: no task head), `labels` (id2label in id
  order), `problem_type`, `classifier_dropout` (None: the architecture's default) and `classifier_pooling`."""
  arch = (hf.get('architectures') or [''])[0]
  task = next((t for suffix, t in TASK_SUFFIXES.items() if arch.endswith(suffix)), None)
  id2label = hf.get('id2label')
  labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
  problem_type = hf.get('problem_type')
  if task == 'classification' and (problem_type == 'regression' or (problem_type is None and labels is not None
                                                                     and len(labels) == 1)):
    task = 'regression'
  if task == 'question_answering':
    labels = QA_LABELS
  return {'task': task, 'labels': labels if task else None, 'problem_type': problem_type,
          'classifier_dropout': hf.get('classifier_dropout'), 'classifier_pooling': hf.get('classifier_pooling', 'cls')}


def head_key_map(model: dict, task: str, prefix: str | None = None) -> list[tuple[tuple, str, bool]]:
  """(our path under a task model's `head`, HF key, transpose?) of `task`'s head."""
  return _mapping(model['type']).head_key_map(model, task, prefix)


def load_hf_task(path: str | os.PathLike, dtype: str = 'float32') -> tuple[ml_collections.ConfigDict, Any, Any,
                                                                             dict, dict]:
  """(config, params, tokenizer, head, info) of a HF folder for a task model: `params` the masked LM's (the MLM
  head fresh where the checkpoint has none, unreported: a task model drops it), `head` the task-head params
  the checkpoint has, in our head layout (a `*For...Classification`'s whole head; BERT's pooler, ModernBERT's
  prediction head of a masked LM), `info` its `task_info`."""
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = resolve(path)
  hf = read_hf_config(path)
  info = task_info(hf)
  state = read_state_dict(path)
  if hf.get('model_type', 'bert') in ('bert', 'roberta', 'electra'):
    state = bert.legacy_names_renamed(state)
  prefix = bert.prefix_of(state, hf.get('model_type', 'bert')).rstrip('.')
  head, used = {}, set()
  for ours, key, transpose in head_key_map(model_config_from_hf(hf), info['task'] or 'classification', prefix):
    if key in state:
      value = np.asarray(state[key], np.float32)
      tree_set(head, ours, np.ascontiguousarray(value.T if transpose else value))
      used.add(key)
  encoder_state = {k: v for k, v in state.items() if k not in used}
  config, params, _ = _config_and_params(path, encoder_state, dtype, zero_head=True)
  tok = tokenizer_lib.load_tokenizer(path)
  return config, jax.tree.map(jnp.asarray, params), tok, head, info


def export(model: Any, out_dir: str) -> None:
  """Writes a Hugging Face folder (config.json, model.safetensors, tokenizer) from a loaded `inference.MLM`
  (a `*ForMaskedLM`) or `inference.Classifier` (a `*ForSequenceClassification` / `*ForTokenClassification` with
  `id2label`, `label2id` and `problem_type`, or a `*ForQuestionAnswering`).

  transformers loads it with `AutoModelForMaskedLM` / `AutoModelFor{Sequence,Token}Classification` and
  `AutoTokenizer`; its pipelines use it directly. Written to a temporary folder and renamed, so a failed export
  leaves nothing. A model whose architecture switches the Hugging Face class cannot represent is refused
  (ValueError) before anything is written.
  """
  if getattr(model, 'task', None) is not None:
    config, state = task_config(model), task_state_dict(model.params, model.config.model, model.task)
  else:
    config = hf_config_from_model(model.config.model, model.tokenizer)
    state = state_dict_from_params(model.params, model.config.model)
    if model.config.model.get('tie_word_embeddings', True):  # rebuilt from the embeddings and bias on load
      state = {k: v for k, v in state.items() if '.decoder.' not in k and k != 'decoder.weight'}
  _write_folder(out_dir, config, state, model.tokenizer,
                model.config.model.max_position_embeddings - position_offset(model.config.model))


def task_config(clf: Any) -> dict:
  """The config.json of a task model (`inference.Classifier`): the architecture's, its task class, labels,
  problem type and head options."""
  model = clf.config.model
  mapping = _mapping(model['type'])
  config = hf_config_from_model(model, clf.tokenizer)
  problem_type = 'regression' if clf.task == 'regression' else clf.problem_type  # None stays None
  config.update(architectures=[mapping.TASK_ARCHITECTURES[model['type']][clf.task]],
                id2label={str(i): label for i, label in enumerate(clf.labels)},
                label2id={label: i for i, label in enumerate(clf.labels)},
                **mapping.head_config(clf.task, clf.classifier_dropout, clf.classifier_pooling))
  if problem_type is not None:
    config['problem_type'] = problem_type
  return config


def task_state_dict(params: Any, model: Any, task: str) -> dict[str, np.ndarray]:
  """A HF `*For{Sequence,Token}Classification` / `*ForQuestionAnswering` state dict in f32 from task params
  `{'encoder', 'head'}`."""
  mapping, state = _mapping(model['type']), {}
  for tree, key_map in ((params['encoder'], mapping.encoder_key_map(model)),
                        (params['head'], mapping.head_key_map(model, task))):
    for ours, key, transpose in key_map:
      value = np.asarray(tree_get(tree, ours), np.float32)
      state[key] = np.ascontiguousarray(value.T if transpose else value)
  return state


def _write_folder(out_dir: str, config: dict, state: dict[str, np.ndarray], tok: Any, max_length: int) -> None:
  """config.json, model.safetensors and the tokenizer into a temporary folder, renamed to `out_dir`."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'{out_dir} exists and is not empty; choose a new --out folder.')
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    save_file(state, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    tok.model_max_length = max_length
    tok.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def import_to_workdir(hf_path: str, workdir: str) -> dict:
  """Starts a workdir from a Hugging Face checkpoint: config.json, tokenizer/ and imported/ params.

  `mlm-flax train --workdir` on it then continues pretraining with a fresh optimizer.
  """
  check_new_workdir(workdir)
  config, params, tok, _ = load_hf(hf_path)
  return write_imported(workdir, config, params, tok)


def check_new_workdir(workdir: str) -> None:
  if os.path.exists(os.path.join(workdir, 'config.json')):
    raise FileExistsError(f'{workdir} already holds a run; import into a new --workdir.')


def write_imported(workdir: str, config: ml_collections.ConfigDict, params: Any, tok: Any) -> dict:
  """Writes an imported run's tokenizer/, imported/ params and config.json (last: a workdir with a config is
  whole); compute dtype training's default ('auto'), not inference's f32."""
  from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top
  from mlm_flax import checkpoint  # pylint: disable=g-import-not-at-top
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config.model.dtype = default.get_config().model.dtype
  os.makedirs(workdir, exist_ok=True)
  tokenizer_lib.save_atomic(tok, os.path.join(workdir, 'tokenizer'))
  config.data.tokenizer = None
  checkpoint.Checkpointer(workdir).save_imported(params)
  workdir_json.write_config(workdir, config.to_dict())
  return {'workdir': workdir, 'model': config.model.to_dict()}
