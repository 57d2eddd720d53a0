"""BERT and RoBERTa: a post-LN (or pre-LN) encoder with an MLM head tied to the word embeddings by default.

Layers named and shaped so Hugging Face BERT and RoBERTa checkpoints map one-to-one (`interop/hf.py`); RoBERTa is
BERT with positions numbered after the padding index (`ModelConfig.position_offset`). Built from `layers.py`
(mixed precision, dropout, attention with the packed-document mask, the padded tied decoder).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.models import layers
from mlm_flax.models.config import ModelConfig
from mlm_flax.models.layers import Dense, Dropout


class Layer(nn.Module):
  """One Transformer layer: post-LN as BERT/RoBERTa (default), or pre-LN (`norm_position='pre'`)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, deterministic: bool,
               row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    dense = functools.partial(Dense, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype,
                              init_std=c.initializer_range)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, param_dtype=c.param_jnp_dtype)
    b, l, h = x.shape
    head_dim = h // c.num_heads
    pre = c.norm_position == 'pre'
    inputs = x
    if pre:  # pre-LN: normalise the branch input, keep the residual stream un-normalised
      x = norm(name='attention_norm')(x)

    q, k, v = (dense(h, name=n)(x).reshape(b, l, c.num_heads, head_dim).transpose(0, 2, 1, 3)
               for n in ('query', 'key', 'value'))
    context = layers.attention(q, k, v, attention_bias, dtype=c.compute_dtype, dropout_rate=c.attention_dropout,
                               deterministic=deterministic, mode=c.attention, row_ids=row_ids)
    attn = Dropout(c.hidden_dropout)(dense(h, name='attention_output')(context),
                                     deterministic=deterministic, row_ids=row_ids)
    x = inputs + attn if pre else norm(name='attention_norm')(inputs + attn)

    y = norm(name='output_norm')(x) if pre else x
    y = layers.activation(c.hidden_act)(dense(c.intermediate_size, name='intermediate')(y))
    y = Dropout(c.hidden_dropout)(dense(h, name='output')(y), deterministic=deterministic, row_ids=row_ids)
    return x + y if pre else norm(name='output_norm')(x + y)


class BertMLM(nn.Module):
  """Encoder + MLM head tied to the word embeddings (or, with `tie_word_embeddings=False`, its own decoder).

  `__call__` returns logits [batch, P, vocab] at `masked_positions` [batch, P]
  (training computes the head only where predictions are scored), or at every
  position when `masked_positions` is None. `encode` returns the last hidden states. `row_ids` [batch]
  (optional) are the rows' indices in the global batch, from which dropout draws (see `Dropout`).
  `mlm_head=False`: the encoder alone, without the MLM head's params (the task models' encoder, `tasks/model.py`).
  """
  config: ModelConfig
  mlm_head: bool = True

  def setup(self):
    c = self.config
    if c.hidden_size % c.num_heads:
      raise ValueError(f'model.hidden_size={c.hidden_size} is not divisible by '
                       f'model.num_heads={c.num_heads}')
    init = nn.initializers.normal(c.initializer_range)
    embed = functools.partial(nn.Embed, embedding_init=init, param_dtype=c.param_jnp_dtype)
    self.word_embeddings = embed(c.vocab_size, c.hidden_size)
    self.position_embeddings = embed(c.max_position_embeddings, c.hidden_size)
    self.token_type_embeddings = embed(c.type_vocab_size, c.hidden_size)
    self.embeddings_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_jnp_dtype)
    self.embeddings_dropout = Dropout(c.hidden_dropout)
    # remat: keep only each layer's input for the backward pass and recompute the rest (less memory,
    # ~1/3 more compute); `deterministic` (argument 3, counting self) is static.
    layer = nn.remat(Layer, static_argnums=(3,)) if c.remat else Layer
    self.layers = [layer(c, name=f'layer_{i}') for i in range(c.num_layers)]
    pre = c.norm_position == 'pre'
    self.final_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_jnp_dtype) if pre else None
    self.head_transform = Dense(c.hidden_size, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype,
                                init_std=c.initializer_range)
    self.head_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_jnp_dtype)
    self.head_bias = (self.param('head_bias', nn.initializers.zeros, (c.vocab_size,), c.param_jnp_dtype)
                      if self.mlm_head else None)
    # An untied decoder [vocab, hidden] (Hugging Face `tie_word_embeddings=False`); tied by default.
    self.decoder = (None if c.tie_word_embeddings or not self.mlm_head
                    else self.param('decoder', init, (c.vocab_size, c.hidden_size), c.param_jnp_dtype))

  def encode(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, deterministic: bool = True,
             row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(positions + c.position_offset)
         + self.token_type_embeddings(token_type_ids))
    x = self.embeddings_dropout(self.embeddings_norm(x), deterministic=deterministic, row_ids=row_ids)
    attention_bias = layers.attention_bias(segment_ids)
    for layer in self.layers:
      x = layer(x, attention_bias, deterministic, row_ids)
    return self.final_norm(x) if self.final_norm is not None else x

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, masked_positions: jax.Array | None = None,
               deterministic: bool = True, row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    x = self.encode(input_ids, segment_ids, positions, token_type_ids, deterministic, row_ids)
    x = layers.at_positions(x, masked_positions)
    x = self.head_norm(layers.activation(c.hidden_act)(self.head_transform(x)))
    return self.decode(x)

  def decode(self, x: jax.Array) -> jax.Array:
    """Vocabulary logits through the tied embeddings (or the untied `decoder`, same layout), padded to
    `vocab_multiple` rows for the matmul (`layers.decode`)."""
    c = self.config
    embedding = self.word_embeddings.embedding if self.decoder is None else self.decoder
    return layers.decode(x, embedding, c.vocab_multiple, c.compute_dtype) + self.head_bias


MODEL = BertMLM


def check_config(cfg: ModelConfig) -> None:
  """BERT/RoBERTa have no checks beyond the generic ones (`validation.validate_config`)."""
  del cfg


def flops_terms(cfg: ModelConfig, seq_len: int) -> dict:
  """How `flops.train_flops_per_token` counts this architecture: a two-matmul MLP, full attention."""
  del cfg, seq_len
  return {'glu': False, 'attended': None}
