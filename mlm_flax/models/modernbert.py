"""ModernBERT (Warner et al. 2024) with a tied MLM head, in Flax linen, exact against transformers'
`ModernBertForMaskedLM`.

Differences from BERT, all as the Hugging Face reference computes them:
- embeddings: token embeddings only (no positions, no token types), LayerNorm, dropout;
- pre-LN layers; layer 0 has no attention norm (its input is the already normalised embedding);
- fused QKV projection, rotary position embeddings (RoPE) on queries and keys, with one base for
  full-attention layers (`global_rope_theta`) and one for sliding-window layers (`local_rope_theta`);
- sliding-window layers let token i attend to token j only when |i - j| <= local_attention // 2;
- GeGLU MLP: `Wi` makes 2 * intermediate_size features, split into (input, gate), act(input) * gate, `Wo`;
- a final LayerNorm, then the head (dense, activation, LayerNorm) and the decoder tied to the embeddings;
- optional biases (`attention_bias`, `mlp_bias`, `norm_bias`, `decoder_bias`, `classifier_bias`), by default
  only the decoder's.

Params are named as in `model.BertMLM` (`word_embeddings`, `layer_{i}/attention_norm`, ...; `qkv` is the fused
projection), so the MLM head, decoding and the Hugging Face key map read the same way. Packed rows: attention stays
inside a document (`segment_ids`) and within the window; RoPE `positions` restart per document. Mixed precision is
BertMLM's: matmuls through `mixed_einsum`, norms, softmax, RoPE and the residual stream in f32.
"""

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mlm_flax import model as bert_model
from mlm_flax.model import Dense, Dropout, mixed_einsum

# Shared with BERT until the layers move to their own module.
_activation = bert_model._activation  # pylint: disable=protected-access
_use_dot_product_attention = bert_model._use_dot_product_attention  # pylint: disable=protected-access

LAYER_TYPES = ('full_attention', 'sliding_attention')
# The architecture's own value of each bias switch (`model.<key>=None` in the config).
BIAS_DEFAULTS = {'attention_bias': False, 'mlp_bias': False, 'norm_bias': False, 'decoder_bias': True,
                 'classifier_bias': False}


def option(model_cfg: Mapping[str, Any], key: str) -> bool:
  """A bias switch of the `model` config, None meaning ModernBERT's default."""
  value = model_cfg.get(key)
  return BIAS_DEFAULTS[key] if value is None else bool(value)


def layer_types(model_cfg: Mapping[str, Any]) -> tuple[str, ...]:
  """Each layer's attention, 'full_attention' or 'sliding_attention'.

  `model.layer_types` lists them (comma-separated); when empty, every `global_attn_every_n_layers`-th layer
  from layer 0 is full and the others slide (Hugging Face's legacy rule). Raises ValueError naming the fix.
  """
  n = model_cfg['num_layers']
  spec = model_cfg.get('layer_types') or ''
  if spec:
    types = tuple(t.strip() for t in spec.split(','))
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
      raise ValueError(f'model.layer_types has {bad[0]!r}; each comma-separated entry must be one of '
                       f'{", ".join(LAYER_TYPES)}.')
    if len(types) != n:
      raise ValueError(f'model.layer_types lists {len(types)} layers but model.num_layers={n}; give one entry '
                       'per layer, or set model.layer_types=\'\' to use model.global_attn_every_n_layers.')
    return types
  every = model_cfg.get('global_attn_every_n_layers', 3)
  if not isinstance(every, int) or every < 1:
    raise ValueError(f'model.global_attn_every_n_layers={every!r} must be an integer >= 1 (1: all layers full).')
  return tuple('sliding_attention' if i % every else 'full_attention' for i in range(n))


def check_config(model_cfg: Mapping[str, Any]) -> None:
  """Raises ValueError for a ModernBERT config that cannot build (before any data is read)."""
  layer_types(model_cfg)
  if not model_cfg.get('tie_word_embeddings', True):
    raise ValueError('model.tie_word_embeddings=False is not supported for ModernBERT (its decoder is the token '
                     'embeddings); leave it True.')
  if model_cfg.get('local_attention', 128) < 2:
    raise ValueError(f'model.local_attention={model_cfg.get("local_attention")} must be at least 2 (the whole '
                     'window: tokens at most local_attention // 2 apart attend to each other).')
  head_dim = model_cfg['hidden_size'] // model_cfg['num_heads']
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head size; hidden_size / num_heads = {head_dim}; change num_heads.')


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [batch, 1, len, head_dim] of rotary embeddings at `positions` [batch, len] (f32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [batch, heads, len, head_dim] by the tables (the 'rotate half' convention of Hugging Face)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Layer(nn.Module):
  """One pre-LN ModernBERT layer: [norm] → fused QKV → RoPE → attention → Wo; norm → GeGLU MLP."""
  config: ml_collections.FrozenConfigDict
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    b, l, h = x.shape
    heads, head_dim = c.num_heads, h // c.num_heads
    out_std = c.initializer_range / math.sqrt(2.0 * c.num_layers)  # Hugging Face's init of output projections
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_bias=option(c, 'norm_bias'),
                             param_dtype=c.param_dtype)
    attn_bias, mlp_bias = option(c, 'attention_bias'), option(c, 'mlp_bias')

    y = x if self.index == 0 else norm(name='attention_norm')(x)
    qkv = dense(3 * h, use_bias=attn_bias, name='qkv')(y)  # features ordered (q|k|v, head, head_dim)
    q, k, v = qkv.reshape(b, l, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)  # each [b, heads, l, head_dim]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if _use_dot_product_attention(c.get('attention', 'auto'), c.attention_dropout, deterministic):
      q, k, v = (t.transpose(0, 2, 1, 3).astype(c.dtype) for t in (q, k, v))
      context = jax.nn.dot_product_attention(q, k, v, mask=attention_bias == 0).astype(jnp.float32)
      context = context.reshape(b, l, h)
    else:
      scores = mixed_einsum('bhqd,bhkd->bhqk', q * head_dim ** -0.5, k, c.dtype) + attention_bias
      probs = Dropout(c.attention_dropout)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
      context = mixed_einsum('bhqk,bhkd->bhqd', probs, v, c.dtype).transpose(0, 2, 1, 3).reshape(b, l, h)
    attn = dense(h, use_bias=attn_bias, init_std=out_std, name='attention_output')(context)
    x = x + Dropout(c.attention_dropout)(attn, deterministic=deterministic)

    y = norm(name='output_norm')(x)
    inputs, gate = jnp.split(dense(2 * c.intermediate_size, use_bias=mlp_bias, name='intermediate')(y), 2, axis=-1)
    y = Dropout(c.hidden_dropout)(_activation(c.hidden_act)(inputs) * gate, deterministic=deterministic)
    return x + dense(h, use_bias=mlp_bias, init_std=out_std, name='output')(y)


class ModernBertMLM(nn.Module):
  """ModernBERT encoder + MLM head tied to the token embeddings; the interface of `model.BertMLM`.

  `__call__` returns logits [batch, P, vocab] at `masked_positions` [batch, P], or at every position when
  None; `encode` returns the last hidden states (after the final norm). `token_type_ids` is accepted and
  ignored (ModernBERT has no token types).
  """
  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    if c.hidden_size % c.num_heads:
      raise ValueError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}')
    check_config(c)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_bias=option(c, 'norm_bias'),
                             param_dtype=c.param_dtype)
    self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=c.param_dtype,
                                    embedding_init=nn.initializers.normal(c.initializer_range))
    self.embeddings_norm = norm()
    self.embeddings_dropout = Dropout(c.hidden_dropout)
    # remat: keep each layer's input only and recompute the rest; `deterministic` (argument 5, counting self) is static.
    layer = nn.remat(Layer, static_argnums=(5,)) if c.get('remat', False) else Layer
    self.layers = [layer(c, i, name=f'layer_{i}') for i in range(c.num_layers)]
    self.final_norm = norm()
    self.head_transform = Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, use_bias=option(
        c, 'classifier_bias'), init_std=c.initializer_range / math.sqrt(2.0 * c.num_layers))
    self.head_norm = norm()
    self.head_bias = (self.param('head_bias', nn.initializers.zeros, (c.vocab_size,), c.param_dtype)
                      if option(c, 'decoder_bias') else None)

  def encode(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    del token_type_ids  # no token types in ModernBERT
    c = self.config
    length = input_ids.shape[-1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    x = self.embeddings_dropout(self.embeddings_norm(self.word_embeddings(input_ids)), deterministic=deterministic)
    same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    distance = jnp.abs(jnp.arange(length)[:, None] - jnp.arange(length)[None, :])
    in_window = same_doc & (distance <= c.local_attention // 2)  # documents are contiguous: row distance
    lowest = jnp.finfo(jnp.float32).min
    biases = {'full_attention': jnp.where(same_doc, 0.0, lowest)[:, None],
              'sliding_attention': jnp.where(in_window, 0.0, lowest)[:, None]}
    head_dim = c.hidden_size // c.num_heads
    thetas = {'full_attention': c.global_rope_theta, 'sliding_attention': c.local_rope_theta}
    types = layer_types(c)
    rope = {t: rope_tables(positions, head_dim, thetas[t]) for t in set(types)}
    for layer, kind in zip(self.layers, types):
      x = layer(x, biases[kind], *rope[kind], deterministic)
    return self.final_norm(x)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, masked_positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    c = self.config
    x = self.encode(input_ids, segment_ids, positions, token_type_ids, deterministic)
    if masked_positions is not None:
      x = jnp.take_along_axis(x, masked_positions[..., None], axis=1)
    x = self.head_norm(_activation(c.hidden_act)(self.head_transform(x)))
    return self.decode(x)

  def decode(self, x: jax.Array) -> jax.Array:
    """Vocabulary logits through the tied embeddings, padded to `vocab_multiple` rows as `BertMLM.decode`."""
    c = self.config
    embedding = self.word_embeddings.embedding
    vocab = embedding.shape[0]
    pad = -vocab % c.get('vocab_multiple', 1)
    if pad:
      embedding = jnp.pad(embedding, ((0, pad), (0, 0)))
    logits = mixed_einsum('bph,vh->bpv', x, embedding, c.dtype)[..., :vocab]
    return logits if self.head_bias is None else logits + self.head_bias
