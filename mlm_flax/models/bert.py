"""BERT and RoBERTa: a post-LN (or pre-LN) encoder with an MLM head tied to the word embeddings by default.

Layers named and shaped so Hugging Face BERT and RoBERTa checkpoints map one-to-one (`interop/hf.py`); RoBERTa is
BERT with positions numbered after the padding index (`ModelConfig.position_offset`). Built from `layers.py`
(mixed precision, dropout, attention with the packed-document mask, MLPs, norms, RoPE) and `heads.py` (the MLM
head). The architecture switches (`model.mlp`, `norm`, `positions`, `norm_position`, the five biases; None:
BERT's own) give ablations such as a ModernBERT-style BERT; only BERT's own values export to Hugging Face.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.models import layers
from mlm_flax.models.config import ModelConfig
from mlm_flax.models.heads import MaskedLM
from mlm_flax.models.layers import Dense, Dropout, apply_rope, rope_tables


class Layer(nn.Module):
  """One Transformer layer: post-LN as BERT/RoBERTa (default), or pre-LN (`norm_position='pre'`); RoPE on
  queries and keys when `rope` (cos, sin) is given."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, deterministic: bool, row_ids: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    c = self.config.resolved
    dense = functools.partial(Dense, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype,
                              init_std=c.initializer_range)
    norm = functools.partial(layers.norm, c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype,
                             dtype=c.compute_dtype)
    b, l, h = x.shape
    head_dim = h // c.num_heads
    pre = c.norm_position == 'pre'
    inputs = x
    if pre:  # pre-LN: normalise the branch input, keep the residual stream un-normalised
      x = norm(name='attention_norm')(x)

    q, k, v = (dense(h, use_bias=c.attention_bias, name=n)(x).reshape(b, l, c.num_heads, head_dim)
               .transpose(0, 2, 1, 3) for n in ('query', 'key', 'value'))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    context = layers.attention(q, k, v, attention_bias, dtype=c.compute_dtype, dropout_rate=c.attention_dropout,
                               deterministic=deterministic, mode=c.attention, row_ids=row_ids)
    attn = Dropout(c.hidden_dropout)(dense(h, use_bias=c.attention_bias, name='attention_output')(context),
                                     deterministic=deterministic, row_ids=row_ids)
    x = inputs + attn if pre else norm(name='attention_norm')(inputs + attn)

    y = norm(name='output_norm')(x) if pre else x
    y = layers.mlp(y, c.mlp, c.hidden_act, c.intermediate_size, dense, use_bias=c.mlp_bias,
                   dropout_rate=c.hidden_dropout, deterministic=deterministic, row_ids=row_ids)
    return x + y if pre else norm(name='output_norm')(x + y)


class BertMLM(MaskedLM):
  """BERT/RoBERTa encoder + the MLM head of `heads.MaskedLM` (tied to the word embeddings, or with
  `tie_word_embeddings=False` its own decoder). `encode` returns the last hidden states."""

  def setup(self):
    c = self.config.resolved
    if c.hidden_size % c.num_heads:
      raise ValueError(f'model.hidden_size={c.hidden_size} is not divisible by '
                       f'model.num_heads={c.num_heads}')
    check_config(c)
    init = nn.initializers.normal(c.initializer_range)
    embed = functools.partial(nn.Embed, embedding_init=init, param_dtype=c.param_jnp_dtype)
    norm = functools.partial(layers.norm, c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype,
                             dtype=c.compute_dtype)
    width = c.embedding_width
    self.word_embeddings = embed(c.vocab_size, width)
    # positions='rope': no position embeddings, RoPE in every layer instead.
    self.position_embeddings = embed(c.max_position_embeddings, width) if c.positions == 'learned' else None
    self.token_type_embeddings = embed(c.type_vocab_size, width)
    self.embeddings_norm = norm()
    self.embeddings_dropout = Dropout(c.hidden_dropout)
    # ELECTRA's narrower (or wider) embeddings: projected to the hidden size (Hugging Face `embeddings_project`).
    self.embeddings_project = (None if width == c.hidden_size else Dense(
        c.hidden_size, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype, init_std=c.initializer_range))
    # remat: keep only each layer's input for the backward pass and recompute the rest (less memory,
    # ~1/3 more compute); `deterministic` (argument 3, counting self) is static.
    layer = nn.remat(Layer, static_argnums=(3,)) if c.remat else Layer
    self.layers = [layer(c, name=f'layer_{i}') for i in range(c.num_layers)]
    self.final_norm = norm() if c.norm_position == 'pre' else None
    self.setup_head(c.initializer_range)

  def encode(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, deterministic: bool = True,
             row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config.resolved
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.word_embeddings(input_ids)
    if self.position_embeddings is not None:
      x = x + self.position_embeddings(positions + c.position_offset)
    x = x + self.token_type_embeddings(token_type_ids)
    x = self.embeddings_dropout(self.embeddings_norm(x), deterministic=deterministic, row_ids=row_ids)
    if self.embeddings_project is not None:
      x = self.embeddings_project(x)
    attention_bias = layers.attention_bias(segment_ids)
    rope = rope_tables(positions, c.hidden_size // c.num_heads, c.global_rope_theta,
                       c.max_position_embeddings) if c.positions == 'rope' else None
    for layer in self.layers:
      x = layer(x, attention_bias, deterministic, row_ids, rope)
    return self.final_norm(x) if self.final_norm is not None else x


MODEL = BertMLM


def check_config(cfg: ModelConfig) -> None:
  """Raises ValueError for a BERT/RoBERTa config that cannot build (beyond `validation.validate_config`'s checks)."""
  c = cfg.resolved
  if c.embedding_size is not None and c.embedding_size < 1:
    raise ValueError(f'model.embedding_size={c.embedding_size} must be at least 1; or leave it unset (hidden_size).')
  if c.positions == 'rope' and (c.hidden_size // c.num_heads) % 2:
    raise ValueError(f'model.positions=\'rope\' needs an even head size; hidden_size / num_heads = '
                     f'{c.hidden_size // c.num_heads}; change model.num_heads.')


def flops_terms(cfg: ModelConfig, seq_len: int) -> dict:
  """How `flops.train_flops_per_token` counts this architecture: a two-matmul MLP, or three for a gated one
  (`model.mlp` 'geglu'/'swiglu'); full attention."""
  del seq_len
  return {'glu': cfg.resolved.mlp != 'gelu', 'attended': None}
