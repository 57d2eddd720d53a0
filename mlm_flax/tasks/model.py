"""`TaskModel`: a pretrained encoder with a classification, regression or token-classification head.

Params are `{'encoder': ..., 'head': ...}`. The encoder is the architecture's own module without its MLM head
(`MODEL(cfg, mlm_head=False).encode`), so its params are a pretraining checkpoint's minus the MLM head leaves,
names unchanged; the head is the architecture's (`mlm_flax.models.heads`), the Hugging Face head exactly, so
`interop/hf.py` exports a `*ForSequenceClassification` / `*ForTokenClassification` folder.

`load_encoder(MODEL)` reads what a task model starts from (a pretraining workdir `DIR` or `DIR:STEP`, a
Hugging Face folder or hub name, or a fine-tuned workdir); `task_params_from_encoder` puts it into fresh params.
"""

import logging
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax import workdir_json
from mlm_flax.models import ModelConfig, architecture, heads

# Head params a masked LM's own head gives a task head, per architecture (`HEAD_FROM_MLM[type][ours] = MLM path`):
# Hugging Face's `ModernBertFor*Classification.from_pretrained` of a masked LM loads its prediction head.
HEAD_FROM_MLM = {'modernbert': {'dense': 'head_transform', 'norm': 'head_norm'}}


class TaskModel(nn.Module):
  """The encoder of `config.type` and its task head.

  `__call__` returns logits [batch, num_labels] (sequence tasks) or [batch, len, num_labels]
  (`token_classification`; `question_answering`: start and end logits, num_labels 2). `segment_ids`: 1 on real
  tokens, 0 on padding (the pretraining convention). Dropout (`deterministic=False`) needs a 'dropout' rng and
  draws per row from `row_ids` (`layers.Dropout`), as pretraining.
  """
  config: ModelConfig
  task: str  # 'classification' | 'regression' | 'token_classification' | 'question_answering'
  num_labels: int  # 1 for regression
  classifier_dropout: float  # dropout before the classifier
  classifier_pooling: str = 'cls'  # 'cls', or 'mean' over real tokens (ModernBERT only, as Hugging Face)

  def setup(self):
    heads.check_head(self.config.type, self.task, self.num_labels, self.classifier_pooling)
    self.encoder = architecture(self.config.type).MODEL(self.config, mlm_head=False)
    self.head = heads.HEADS[self.config.type](self.config, self.task, self.num_labels, self.classifier_dropout,
                                              self.classifier_pooling)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, token_type_ids: jax.Array | None = None,
               deterministic: bool = True, row_ids: jax.Array | None = None) -> jax.Array:
    hidden = self.encoder.encode(input_ids, segment_ids, None, token_type_ids, deterministic, row_ids)
    return self.head(hidden, segment_ids, deterministic, row_ids)


def make_task_model(model_cfg: ModelConfig | Any, task: str, num_labels: int, classifier_dropout: float,
                    classifier_pooling: str = 'cls') -> TaskModel:
  """A `TaskModel` from a `model` config (ConfigDict, dict or `ModelConfig`); raises ValueError naming the fix."""
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
  heads.check_head(cfg.type, task, num_labels, classifier_pooling)
  cfg.compute_dtype  # pylint: disable=pointless-statement  # resolve 'auto' now, as the module is built
  return TaskModel(cfg, task, num_labels, classifier_dropout, classifier_pooling)


def init_task_params(rng: jax.Array, task_model: TaskModel, seq_len: int) -> Any:
  """Fresh params `{'encoder', 'head'}` of `task_model` (inputs of length `seq_len`)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(task_model.init)(rng, ids, jnp.ones_like(ids))['params']


def abstract_task_params(task_model: TaskModel, seq_len: int = 8) -> Any:
  """Shapes and dtypes of `task_model`'s params, without allocating them."""
  return jax.eval_shape(lambda: init_task_params(jax.random.PRNGKey(0), task_model, seq_len))


class Encoder(NamedTuple):
  """What a task model starts from (`load_encoder`); a tuple `(model, params, tokenizer, head, ...)`.

  `model`: the `model` config; `params`: the encoder params (no MLM head); `tokenizer`; `head`: task-head params
  found in MODEL, in the head's layout (BERT's pooler, ModernBERT's prediction head, or a whole classifier:
  `task_params_from_encoder` takes those whose shapes fit). When MODEL is a task model (a Hugging Face
  `*For...Classification`, a fine-tuned workdir), `task`, `labels` (names in id order), `problem_type`,
  `classifier_dropout` and `classifier_pooling` say which. `config`: the whole run config; `step`: its step.
  """
  model: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  head: dict
  task: str | None = None
  labels: list[str] | None = None
  problem_type: str | None = None
  classifier_dropout: float | None = None
  classifier_pooling: str = 'cls'
  config: ml_collections.ConfigDict | None = None
  step: int = 0


def _encoder_keys(params: Any, model_cfg: Any) -> dict:
  """`params` of the masked LM minus its MLM head leaves: the keys `MODEL(mlm_head=False)` has."""
  cfg = ModelConfig.from_dict(model_cfg)
  encoder = architecture(cfg.type).MODEL(cfg, mlm_head=False)
  ids = jnp.zeros((1, 8), jnp.int32)
  keys = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), ids, ids + 1, method='encode'))['params']
  return {k: params[k] for k in keys}


def split_step(init: str) -> tuple[str, int | None]:
  """`DIR:STEP` -> (DIR, STEP); anything else -> (init, None)."""
  base, sep, step = init.rpartition(':')
  if sep and step.isdigit() and os.path.isdir(base):
    return base, int(step)
  return init, None


def load_encoder(init: str, dtype: str | None = None) -> Encoder:
  """The encoder (and any task head) of `init`: a pretraining workdir `DIR` or `DIR:STEP` (latest step by
  default, or its imported weights), a fine-tuned workdir (its task and labels too), a Hugging Face folder of
  a BERT/RoBERTa/ELECTRA/ModernBERT `*ForMaskedLM`, `*Model` (`ElectraForPreTraining`: its encoder),
  `*For{Sequence,Token}Classification` or `*ForQuestionAnswering`, or a hub name.

  `dtype`: the compute dtype (`model.dtype`); None keeps the workdir's, or training's default for a Hugging
  Face model.
  """
  from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top
  from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
  path, step = split_step(os.fspath(init))
  if hf.is_hf_folder(path) or (not os.path.exists(path) and hf.looks_like_hub_name(path)):
    config, params, tok, head, info = hf.load_hf_task(path, dtype or default.get_config().model.dtype)
    dropout = info['classifier_dropout']
    dropout = config.model.hidden_dropout if dropout is None else float(dropout)
    return Encoder(model=config.model, params=_encoder_keys(params, config.model), tokenizer=tok, head=head,
                   task=info['task'], labels=info['labels'], problem_type=info['problem_type'],
                   classifier_dropout=dropout, classifier_pooling=info['classifier_pooling'], config=config)
  return _load_workdir(path, step, dtype)


def _load_workdir(path: str, step: int | None, dtype: str | None) -> Encoder:
  from mlm_flax import checkpoint  # pylint: disable=g-import-not-at-top
  from mlm_flax.objectives import objective_module  # pylint: disable=g-import-not-at-top
  saved = workdir_json.read_config(path)
  if saved is None:
    raise FileNotFoundError(f'{path} is not an mlm_flax workdir (no config.json) nor a Hugging Face model folder; '
                            'pass a pretraining or fine-tuning --workdir, a Hugging Face folder or a hub name.')
  config = ml_collections.ConfigDict(saved)
  if dtype is not None:
    config.model.dtype = dtype
  info = finetuned_info(path, config)
  if info is not None:
    task_model = make_task_model(config.model, info['task'], len(info['labels']), info['classifier_dropout'],
                                 info['classifier_pooling'])
    params, step = _restore_finetuned(path, abstract_task_params(task_model), step)
    return Encoder(model=config.model, params=params['encoder'], tokenizer=_tokenizer(path), head=params['head'],
                   task=info['task'], labels=info['labels'], problem_type=info['problem_type'],
                   classifier_dropout=info['classifier_dropout'], classifier_pooling=info['classifier_pooling'],
                   config=config, step=step)
  module = objective_module(config)  # an ELECTRA run: its discriminator's encoder
  target = module.abstract_params(config)
  ckpt = checkpoint.Checkpointer(path, create=False, async_save=False)
  try:
    if step is None and ckpt.latest_step() is None and ckpt.has_imported():
      params, step = ckpt.restore_imported(target), 0
    else:
      params, meta = ckpt.restore_params(target, step)
      if step is not None and int(meta['step']) != step:
        raise FileNotFoundError(f'{path} has no good checkpoint of step {step}; pass one of its steps, or {path} '
                                'for the latest.')
      step = int(meta['step'])
  finally:
    ckpt.close()
  params = module.encoder_of(params)
  mlm_head = {ours: params[theirs] for ours, theirs in HEAD_FROM_MLM.get(config.model.type, {}).items()
              if theirs in params}
  return Encoder(model=config.model, params=_encoder_keys(params, config.model), tokenizer=_tokenizer(path),
                 head=mlm_head, config=config, step=step)


def _tokenizer(workdir: str) -> Any:
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))


def _restore_finetuned(path: str, target: Any, step: int | None) -> tuple[Any, int]:
  """A fine-tuned workdir's params: the best step's (`DIR/best/`, written by `mlm-flax finetune`) unless `step`
  names another; else that (or the latest) training checkpoint's."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mlm_flax import checkpoint  # pylint: disable=g-import-not-at-top
  best_dir = os.path.join(os.path.abspath(path), 'best')
  if os.path.isdir(best_dir):
    with ocp.CheckpointManager(best_dir, options=ocp.CheckpointManagerOptions(create=False)) as best:
      best_step = best.latest_step()
      if best_step is not None and step in (None, best_step):
        restored = best.restore(best_step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return restored['params'], best_step
  ckpt = checkpoint.Checkpointer(path, create=False, async_save=False)
  try:
    params, meta = ckpt.restore_params(target, step)
  finally:
    ckpt.close()
  if step is not None and int(meta['step']) != step:
    raise FileNotFoundError(f'{path} has no good checkpoint of step {step}; pass one of its steps, or {path} for the '
                            'best one.')
  return params, int(meta['step'])


def finetuned_info(path: str, config: ml_collections.ConfigDict) -> dict | None:
  """The task of a fine-tuned workdir (config.json with `task.type`, labels.json), or None for a pretraining one.

  Returns {'task', 'labels', 'problem_type', 'classifier_dropout', 'classifier_pooling'}; a regression's one
  label is named 'LABEL_0' (Hugging Face's default). Raises naming the fix for a multi-seed parent folder.
  """
  if 'task' not in config:
    return None
  task = config.task
  name = task.get('type') if isinstance(task, ml_collections.ConfigDict) else task
  labels = workdir_json.read_labels(path)
  if labels is None:
    seeds = sorted(d for d in os.listdir(path) if d.startswith('seed_'))
    if seeds:
      raise FileNotFoundError(f'{path} holds one fine-tuned model per seed; pass one of them, e.g. '
                              f'{os.path.join(path, seeds[0])}.')
    raise FileNotFoundError(f'{path} is a fine-tuning workdir without labels.json; rerun `mlm-flax finetune` on it.')
  if isinstance(labels, Mapping):
    labels = labels.get('label_names')
  labels = ['LABEL_0'] if name == 'regression' or not labels else [str(l) for l in labels]
  dropout = config.get('classifier_dropout')
  pooling = task.get('classifier_pooling') if isinstance(task, ml_collections.ConfigDict) else None
  problem_type = {'regression': 'regression', 'classification': 'single_label_classification'}.get(name)
  return {'task': name, 'labels': labels, 'problem_type': problem_type,
          'classifier_dropout': config.model.hidden_dropout if dropout is None else float(dropout),
          'classifier_pooling': pooling or config.get('classifier_pooling') or 'cls'}


# The head's output layer per architecture (one row per label): label-specific, unlike the pooler or transform.
OUTPUT_LAYERS = ('classifier', 'out_proj', 'qa_outputs')


def head_for_labels(encoder: Encoder, task: str, label_names: list[str] | None) -> dict:
  """The head params of `encoder` a `task` run with `label_names` (id order) starts from.

  MODEL without a task head (a pretraining workdir, a masked LM): its head params as they are (BERT's pooler,
  ModernBERT's prediction head). MODEL with one: its output layer (`OUTPUT_LAYERS`) only for the same task and
  the same labels as a set, its rows reordered to `label_names`' ids; otherwise that layer starts fresh (logged),
  so a 3-way NLI head never scores another dataset's label order.
  """
  head = dict(encoder.head or {})
  outputs = [k for k in OUTPUT_LAYERS if k in head]
  if encoder.task is None or not outputs:
    return head
  new = ['LABEL_0'] if task == 'regression' else list(label_names or [])
  old = list(encoder.labels or [])
  if encoder.task == task and len(set(old)) == len(old) == len(new) and set(old) == set(new):
    order = np.asarray([old.index(n) for n in new])
    for k in outputs:  # Dense kernel [features, labels], bias [labels]: labels on the last axis
      head[k] = jax.tree.map(lambda x: np.asarray(x)[..., order], head[k])
    return head
  logging.warning('the %s head of the init model is for labels %s, this %s task has %s: its %s starts fresh.',
                  encoder.task, old, task, new, '/'.join(outputs))
  for k in outputs:
    del head[k]
  return head


def task_params_from_encoder(encoder: Encoder | Mapping, fresh_task_params: Any, head: Mapping | None = None) -> Any:
  """`fresh_task_params` (`init_task_params`) with the encoder's params and the head params whose shapes fit
  (a classifier for another number of labels stays fresh, with a warning).

  `encoder`: an `Encoder` (its `params` and `head`), or its params alone, with `head` (e.g. `encoder.head`: BERT's
  pooler) passed apart, as inside jit, where an `Encoder` (its tokenizer) cannot go. Raises ValueError when the
  encoder does not fit the task model.
  """
  if isinstance(encoder, Encoder):
    encoder, head = encoder.params, encoder.head if head is None else head
  fresh_encoder = fresh_task_params['encoder']
  missing = sorted(set(fresh_encoder) - set(encoder))
  if missing:
    raise ValueError(f'the encoder lacks {missing[0]!r}; its `model` config does not match the task model\'s.')

  def take(path, fresh, loaded):
    if np.shape(fresh) != np.shape(loaded):
      raise ValueError(f'encoder param {jax.tree_util.keystr(path)} has shape {np.shape(loaded)}, the task model '
                       f'{np.shape(fresh)}; build the task model from the encoder\'s `model` config.')
    return jnp.asarray(loaded, fresh.dtype)

  params = jax.tree_util.tree_map_with_path(take, fresh_encoder, {k: encoder[k] for k in fresh_encoder})
  shapes = lambda t: jax.tree.map(np.shape, t)
  out_head = dict(fresh_task_params['head'])
  for name, loaded in (head or {}).items():
    fresh = out_head.get(name)
    if fresh is None:  # not part of this head (BERT's pooler under a token-classification head)
      continue
    if jax.tree.structure(fresh) == jax.tree.structure(loaded) and shapes(fresh) == shapes(loaded):
      out_head[name] = jax.tree.map(lambda f, l: jnp.asarray(l, f.dtype), fresh, loaded)
    else:
      logging.warning('head param %r of the loaded model does not fit this task (shapes %s, here %s); initialised '
                      'fresh.', name, shapes(loaded), shapes(fresh))
  return {'encoder': params, 'head': out_head}
