"""The heads on the encoder's hidden states: the MLM head the architectures share, and the task heads.

MLM: hidden states at the masked positions → dense → activation → norm → vocabulary logits through the word
embeddings (tied) or an own `decoder` [vocab, hidden], plus `head_bias`. `MaskedLM` is the base of
`bert.BertMLM` and `modernbert.ModernBertMLM`: a subclass builds its encoder in `setup` (its token embedding named
`word_embeddings`, then `setup_head`) and defines `encode`; `__call__` and `decode` are this class's, and so are
the head's param names (`head_transform`, `head_norm`, `head_bias`, `decoder`) that the Hugging Face mappings read.

ELECTRA's discriminator: `DiscriminatorHead`, one replaced-or-original logit per token (`objectives/electra.py`).

Task heads (fine-tuning, `mlm_flax/tasks/`), one per architecture, each the Hugging Face head exactly:
- BERT (`BertForSequenceClassification`): pooler (dense + tanh) on [CLS] → dropout → `classifier`;
- RoBERTa (`RobertaClassificationHead`): <s> → dropout → `dense` → tanh → dropout → `out_proj`;
- ELECTRA (`ElectraClassificationHead`): RoBERTa's with exact GELU instead of tanh;
- ModernBERT (`ModernBertForSequenceClassification`): [CLS] or the mean over real tokens (`classifier_pooling`)
  → `dense`, activation, `norm` (`ModernBertPredictionHead`) → dropout → `classifier`;
- token classification: BERT/RoBERTa dropout → `classifier` per token; ModernBERT its prediction head first;
- question answering (`*ForQuestionAnswering`): start/end logits per token [batch, len, 2]: BERT/RoBERTa/ELECTRA
  `qa_outputs` on the last hidden states (no dropout, as Hugging Face); ModernBERT its prediction head, dropout,
  `classifier` (its token-classification head with 2 labels).
Params are named after the Hugging Face modules (`interop/` maps them). `HEADS` maps `model.type` to the task
head; a new architecture adds its head here and an entry.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.models import layers
from mlm_flax.models.config import ModelConfig
from mlm_flax.models.layers import Dense, Dropout


class MaskedLM(nn.Module):
  """Encoder (the subclass's `encode`) + MLM head.

  `__call__` returns logits [batch, P, vocab] at `masked_positions` [batch, P] (training computes the head only
  where predictions are scored), or at every position when `masked_positions` is None. `row_ids` [batch]
  (optional): the rows' indices in the global batch, from which dropout draws (see `layers.Dropout`).
  `mlm_head=False`: the encoder alone, without the head's params (the task models' encoder, `tasks/model.py`).
  """
  config: ModelConfig
  mlm_head: bool = True

  def setup_head(self, transform_std: float) -> None:
    """Builds the head (call it at the end of `setup`): its switches (`classifier_bias`, `norm`, `norm_bias`,
    `decoder_bias`, `tie_word_embeddings`) from the resolved config; `transform_std`: the dense layer's init."""
    c = self.config.resolved
    self.head_transform = layers.Dense(c.embedding_width, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype,
                                       use_bias=c.classifier_bias, init_std=transform_std)
    self.head_norm = layers.norm(c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype, dtype=c.compute_dtype)
    self.head_bias = (self.param('head_bias', nn.initializers.zeros, (c.vocab_size,), c.param_jnp_dtype)
                      if c.decoder_bias and self.mlm_head else None)
    # An untied decoder [vocab, hidden] (Hugging Face `tie_word_embeddings=False`); tied by default.
    self.decoder = (None if c.tie_word_embeddings or not self.mlm_head else self.param(
        'decoder', nn.initializers.normal(c.initializer_range), (c.vocab_size, c.embedding_width), c.param_jnp_dtype))

  def encode(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, deterministic: bool = True,
             row_ids: jax.Array | None = None) -> jax.Array:
    """The last hidden states [batch, len, hidden] (the subclass's encoder)."""
    raise NotImplementedError

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, masked_positions: jax.Array | None = None,
               deterministic: bool = True, row_ids: jax.Array | None = None) -> jax.Array:
    x = self.encode(input_ids, segment_ids, positions, token_type_ids, deterministic, row_ids)
    x = layers.at_positions(x, masked_positions)
    x = self.head_norm(layers.activation(self.config.hidden_act)(self.head_transform(x)))
    return self.decode(x)

  def decode(self, x: jax.Array) -> jax.Array:
    """Vocabulary logits through the tied embeddings (or the untied `decoder`, same layout), padded to
    `vocab_multiple` rows for the matmul (`layers.decode`), plus `head_bias` when there is one."""
    c = self.config.resolved
    embedding = self.word_embeddings.embedding if self.decoder is None else self.decoder
    logits = layers.decode(x, embedding, c.vocab_multiple, c.compute_dtype)
    return logits if self.head_bias is None else layers.add_bias(logits, self.head_bias)


class DiscriminatorHead(nn.Module):
  """ELECTRA's replaced-token detection head (`ElectraDiscriminatorPredictions`): `dense` (hidden -> hidden),
  the activation `hidden_act`, `dense_prediction` (hidden -> 1); one f32 logit per token [batch, len]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config.resolved
    dense = functools.partial(Dense, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype, init_std=c.initializer_range)
    x = layers.activation(c.hidden_act)(dense(c.hidden_size, name='dense')(x))
    return dense(1, name='dense_prediction')(x)[..., 0].astype(jnp.float32)


TASKS = ('classification', 'regression', 'token_classification', 'question_answering')
PER_TOKEN = ('token_classification', 'question_answering')  # heads with an output per token
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
    if self.task == 'question_answering':
      return self.dense(2, 'qa_outputs')(x)
    if self.task != 'token_classification':
      x = jnp.tanh(self.dense(self.config.hidden_size, 'pooler')(x[:, 0]))
    return self.classify(x, deterministic, row_ids)


class RobertaHead(Head):
  """`RobertaClassificationHead` / `RobertaForTokenClassification`'s dropout + classifier."""
  activation = staticmethod(jnp.tanh)  # between `dense` and `out_proj`

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    del segment_ids
    if self.task == 'question_answering':
      return self.dense(2, 'qa_outputs')(x)
    if self.task == 'token_classification':
      return self.classify(x, deterministic, row_ids)
    drop = functools.partial(Dropout(self.classifier_dropout), deterministic=deterministic, row_ids=row_ids)
    x = self.activation(self.dense(self.config.hidden_size, 'dense')(drop(x[:, 0])))
    return self.dense(self.num_labels, 'out_proj')(drop(x))


class ElectraHead(RobertaHead):
  """`ElectraClassificationHead` (RoBERTa's with exact GELU, as the ELECTRA authors used) /
  `ElectraForTokenClassification`'s dropout + classifier."""
  activation = staticmethod(layers.activation('gelu'))


class ModernBertHead(Head):
  """`ModernBertFor{Sequence,Token}Classification` / `ModernBertForQuestionAnswering`'s head: pooling ('cls' or
  'mean' over `segment_ids > 0`, sequence tasks), `ModernBertPredictionHead` (dense, activation, norm),
  dropout, classifier."""

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config.resolved
    if self.task not in PER_TOKEN:
      if self.classifier_pooling == 'mean':
        mask = (segment_ids > 0).astype(x.dtype)[..., None]
        x = (x * mask).sum(axis=1) / mask.sum(axis=1)
      else:
        x = x[:, 0]
    x = self.dense(c.hidden_size, 'dense', use_bias=c.classifier_bias)(x)
    x = layers.norm(c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype, name='norm', dtype=c.compute_dtype)(
        layers.activation(c.hidden_act)(x))
    return self.classify(x, deterministic, row_ids)


# model.type -> its head; the sequence poolings of the heads that have more than [CLS]
HEADS = {'bert': BertHead, 'roberta': RobertaHead, 'electra': ElectraHead, 'modernbert': ModernBertHead}
POOLING_SUPPORT = {'modernbert': POOLINGS}


def check_head(model_type: str, task: str, num_labels: int, classifier_pooling: str = 'cls') -> None:
  """Raises ValueError naming the fix for a head that cannot be built."""
  if model_type not in HEADS:
    raise ValueError(f'model.type={model_type!r} has no task head; use one of {", ".join(HEADS)}.')
  if task not in TASKS:
    raise ValueError(f'task={task!r} is not one of {", ".join(TASKS)}.')
  if task == 'question_answering' and num_labels != 2:
    raise ValueError(f'a question-answering head has 2 outputs (start, end), not num_labels={num_labels}.')
  if task == 'regression' and num_labels != 1:
    raise ValueError(f'a regression head has 1 output, not num_labels={num_labels}; set num_labels=1.')
  if num_labels < 1:
    raise ValueError(f'num_labels={num_labels}; a head needs at least 1 label.')
  allowed = POOLING_SUPPORT.get(model_type, ('cls',))
  if classifier_pooling not in allowed:
    raise ValueError(f'classifier_pooling={classifier_pooling!r} is not available for {model_type} '
                     f'(only {", ".join(allowed)}); use {allowed[0]!r}.')
