"""Task heads on the encoder's hidden states, one per architecture, each the Hugging Face head exactly.

- BERT (`BertForSequenceClassification`): pooler (dense + tanh) on [CLS] → dropout → `classifier`;
- RoBERTa (`RobertaClassificationHead`): <s> → dropout → `dense` → tanh → dropout → `out_proj`;
- ModernBERT (`ModernBertForSequenceClassification`): [CLS] or the mean over real tokens (`classifier_pooling`)
  → `dense`, activation, `norm` (`ModernBertPredictionHead`) → dropout → `classifier`;
- token classification: BERT/RoBERTa dropout → `classifier` per token; ModernBERT its prediction head first.

Params are named after the Hugging Face modules (`interop/` maps them). Logits come out in f32. `HEADS` maps
`model.type` to the head; a new architecture adds its head here and an entry.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.models import layers
from mlm_flax.models.config import ModelConfig
from mlm_flax.models.layers import Dense, Dropout

TASKS = ('classification', 'regression', 'token_classification')
POOLINGS = ('cls', 'mean')


class Head(nn.Module):
  """Base of the heads: the task, the number of labels (1: regression), dropout before the classifier,
  and the sequence pooling (`classifier_pooling`: 'cls', or 'mean' where the architecture has it)."""
  config: ModelConfig
  task: str
  num_labels: int
  classifier_dropout: float
  classifier_pooling: str = 'cls'

  def dense(self, features: int, name: str, use_bias: bool = True) -> Dense:
    c = self.config
    return Dense(features, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype, init_std=c.initializer_range,
                 use_bias=use_bias, name=name)

  def classify(self, x: jax.Array, deterministic: bool, row_ids: jax.Array | None) -> jax.Array:
    """dropout → `classifier` (the last layer of every head)."""
    x = Dropout(self.classifier_dropout)(x, deterministic=deterministic, row_ids=row_ids)
    return self.dense(self.num_labels, 'classifier')(x)


class BertHead(Head):
  """`BertForSequenceClassification` / `BertForTokenClassification`'s head."""

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    del segment_ids
    if self.task != 'token_classification':
      x = jnp.tanh(self.dense(self.config.hidden_size, 'pooler')(x[:, 0]))
    return self.classify(x, deterministic, row_ids)


class RobertaHead(Head):
  """`RobertaClassificationHead` / `RobertaForTokenClassification`'s dropout + classifier."""

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    del segment_ids
    if self.task == 'token_classification':
      return self.classify(x, deterministic, row_ids)
    drop = functools.partial(Dropout(self.classifier_dropout), deterministic=deterministic, row_ids=row_ids)
    x = jnp.tanh(self.dense(self.config.hidden_size, 'dense')(drop(x[:, 0])))
    return self.dense(self.num_labels, 'out_proj')(drop(x))


class ModernBertHead(Head):
  """`ModernBertForSequenceClassification` / `ModernBertForTokenClassification`'s head: pooling ('cls' or
  'mean' over `segment_ids > 0`, sequence tasks), `ModernBertPredictionHead` (dense, activation, norm),
  dropout, classifier."""

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    from mlm_flax.models import modernbert  # pylint: disable=g-import-not-at-top
    c = self.config
    if self.task != 'token_classification':
      if self.classifier_pooling == 'mean':
        mask = (segment_ids > 0).astype(x.dtype)[..., None]
        x = (x * mask).sum(axis=1) / mask.sum(axis=1)
      else:
        x = x[:, 0]
    x = self.dense(c.hidden_size, 'dense', use_bias=modernbert.option(c, 'classifier_bias'))(x)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_bias=modernbert.option(c, 'norm_bias'),
                     param_dtype=c.param_jnp_dtype, name='norm')(layers.activation(c.hidden_act)(x))
    return self.classify(x, deterministic, row_ids)


# model.type -> its head; the sequence poolings of the heads that have more than [CLS]
HEADS = {'bert': BertHead, 'roberta': RobertaHead, 'modernbert': ModernBertHead}
POOLING_SUPPORT = {'modernbert': POOLINGS}


def check_head(model_type: str, task: str, num_labels: int, classifier_pooling: str = 'cls') -> None:
  """Raises ValueError naming the fix for a head that cannot be built."""
  if model_type not in HEADS:
    raise ValueError(f'model.type={model_type!r} has no task head; use one of {", ".join(HEADS)}.')
  if task not in TASKS:
    raise ValueError(f'task={task!r} is not one of {", ".join(TASKS)}.')
  if task == 'regression' and num_labels != 1:
    raise ValueError(f'a regression head has 1 output, not num_labels={num_labels}; set num_labels=1.')
  if num_labels < 1:
    raise ValueError(f'num_labels={num_labels}; a head needs at least 1 label.')
  allowed = POOLING_SUPPORT.get(model_type, ('cls',))
  if classifier_pooling not in allowed:
    raise ValueError(f'classifier_pooling={classifier_pooling!r} is not available for {model_type} '
                     f'(only {", ".join(allowed)}); use {allowed[0]!r}.')
