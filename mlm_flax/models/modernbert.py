"""ModernBERT (Warner et al. 2024) with a tied MLM head, in Flax linen, exact against transformers'
`ModernBertForMaskedLM`.

Differences from BERT, all as the Hugging Face reference computes them:
- embeddings: token embeddings only (no positions, no token types), LayerNorm, dropout (`model.embedding_size`,
  ours only: another width, projected to the hidden size as BERT's `embeddings_project`; an ELECTRA generator's);
- pre-LN layers; layer 0 has no attention norm (its input is the already normalised embedding);
- fused QKV projection, rotary position embeddings (RoPE) on queries and keys, with one base for
  full-attention layers (`global_rope_theta`) and one for sliding-window layers (`local_rope_theta`);
- sliding-window layers let token i attend to token j only when |i - j| <= local_attention // 2;
- GeGLU MLP: `Wi` makes 2 * intermediate_size features, split into (input, gate), act(input) * gate, `Wo`;
- a final LayerNorm, then the head (dense, activation, LayerNorm) and the decoder tied to the embeddings;
- optional biases (`attention_bias`, `mlp_bias`, `norm_bias`, `decoder_bias`, `classifier_bias`), by default
  only the decoder's.
The switches `model.mlp` ('gelu', 'swiglu') and `model.norm` ('rmsnorm') replace the GeGLU and the LayerNorms
for ablations (`layers.mlp`, `layers.norm`; not exportable); RoPE and pre-LN are ModernBERT's by definition.

Params are named as in `bert.BertMLM` (`word_embeddings`, `layer_{i}/attention_norm`, ...; `qkv` is the fused
projection), so the MLM head (`heads.MaskedLM`, shared), decoding and the Hugging Face key map read the same
way. Packed rows: attention stays inside a document (`segment_ids`) and within the window; RoPE `positions` restart
per document. Mixed precision is BertMLM's (`layers.py`): matmuls through `mixed_einsum`, norms, softmax, RoPE and
the residual stream in f32.
"""

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.kernels import onednn
from mlm_flax.models import layers
from mlm_flax.models.config import BIASES, OWN, ModelConfig
from mlm_flax.models.heads import MaskedLM
from mlm_flax.models.layers import Dense, Dropout, apply_rope, rope_tables

LAYER_TYPES = ('full_attention', 'sliding_attention')
# The architecture's own value of each bias switch (`model.<key>=None` in the config).
BIAS_DEFAULTS = {key: OWN['modernbert'][key] for key in BIASES}


def _config(model_cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
  return model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)


def option(model_cfg: ModelConfig | Mapping[str, Any], key: str) -> Any:
  """A switch of the `model` config (a bias: a bool), None meaning ModernBERT's own value."""
  return getattr(_config(model_cfg).resolved, key)


def layer_types(model_cfg: ModelConfig | Mapping[str, Any]) -> tuple[str, ...]:
  """Each layer's attention, 'full_attention' or 'sliding_attention'.

  `model.layer_types` lists them (comma-separated); when empty, every `global_attn_every_n_layers`-th layer
  from layer 0 is full and the others slide (Hugging Face's legacy rule). Raises ValueError naming the fix.
  """
  c = _config(model_cfg)
  n = c.num_layers
  spec = c.layer_types or ''
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
  every = c.global_attn_every_n_layers
  if not isinstance(every, int) or every < 1:
    raise ValueError(f'model.global_attn_every_n_layers={every!r} must be an integer >= 1 (1: all layers full).')
  return tuple('sliding_attention' if i % every else 'full_attention' for i in range(n))


def check_config(model_cfg: ModelConfig | Mapping[str, Any]) -> None:
  """Raises ValueError for a ModernBERT config that cannot build (before any data is read)."""
  c = _config(model_cfg)
  layer_types(c)
  if c.positions not in (None, 'rope'):
    raise ValueError(f'model.positions={c.positions!r}: ModernBERT has rotary positions by definition; leave '
                     "model.positions unset (or 'rope'), or use model.type=bert for learned positions.")
  if c.norm_position not in (None, 'pre'):
    raise ValueError(f'model.norm_position={c.norm_position!r}: ModernBERT is pre-LN by definition; leave '
                     "model.norm_position unset (or 'pre'), or use model.type=bert for a post-LN encoder.")
  if c.embedding_size is not None and c.embedding_size < 1:
    raise ValueError(f'model.embedding_size={c.embedding_size} must be at least 1; or leave it unset (hidden_size).')
  if not c.tie_word_embeddings:
    raise ValueError('model.tie_word_embeddings=False is not supported for ModernBERT (its decoder is the token '
                     'embeddings); leave it True.')
  if c.local_attention < 2:
    raise ValueError(f'model.local_attention={c.local_attention} must be at least 2 (the whole '
                     'window: tokens at most local_attention // 2 apart attend to each other).')
  head_dim = c.hidden_size // c.num_heads
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head size; hidden_size / num_heads = {head_dim}; change num_heads.')


def flops_terms(cfg: ModelConfig, seq_len: int) -> dict:
  """How `flops.train_flops_per_token` counts ModernBERT: a gated MLP (GeGLU, its own, or SwiGLU: three h x f
  matmuls; two with `model.mlp='gelu'`); a sliding-window layer attends to at most 2 * (local_attention // 2) + 1
  tokens instead of `seq_len`."""
  window = min(seq_len, 2 * (cfg.local_attention // 2) + 1)
  attended = tuple(seq_len if t == 'full_attention' else window for t in layer_types(cfg))
  return {'glu': cfg.resolved.mlp != 'gelu', 'attended': attended}


class Layer(nn.Module):
  """One pre-LN ModernBERT layer: [norm] → fused QKV → RoPE → attention → Wo; norm → MLP (GeGLU)."""
  config: ModelConfig
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool, row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config.resolved
    b, l, h = x.shape
    heads, head_dim = c.num_heads, h // c.num_heads
    out_std = c.initializer_range / math.sqrt(2.0 * c.num_layers)  # Hugging Face's init of output projections
    dense = functools.partial(Dense, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype, init_std=c.initializer_range)
    norm = functools.partial(layers.norm, c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype,
                             dtype=c.compute_dtype)
    attn_bias = c.attention_bias

    y = x if self.index == 0 else norm(name='attention_norm')(x)
    qkv = dense(3 * h, use_bias=attn_bias, name='qkv')(y)  # features ordered (q|k|v, head, head_dim)
    if layers.fused_cpu_attention(c.compute_dtype, c.attention_dropout, deterministic, c.attention, l):
      # One kernel from the projection (RoPE, head split and layouts inside): the path below, without its copies.
      context = onednn.qkv_attention(qkv, cos, sin, attention_bias, heads)
    else:
      # Split, not unpacked from a [3, ...] array: the backward is then one concatenation, not three padded sums.
      q, k, v = (t.reshape(b, l, heads, head_dim).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, axis=-1))
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      # cudnn=False: XLA's attention, as before the layers were shared (cuDNN with the sliding-window mask is
      # not yet checked against it on a GPU).
      context = layers.attention(q, k, v, attention_bias, dtype=c.compute_dtype, dropout_rate=c.attention_dropout,
                                 deterministic=deterministic, mode=c.attention, row_ids=row_ids, cudnn=False)
    attn = dense(h, use_bias=attn_bias, init_std=out_std, name='attention_output')(context)
    # The residual add and the norm after it: one kernel each way where the norm runs as one (`layers.Norm`).
    x, y = norm(name='output_norm')(x, Dropout(c.attention_dropout)(attn, deterministic=deterministic,
                                                                   row_ids=row_ids))
    return x + layers.mlp(y, c.mlp, c.hidden_act, c.intermediate_size, dense, use_bias=c.mlp_bias,
                          dropout_rate=c.hidden_dropout, deterministic=deterministic, dropout_on='hidden',
                          out_std=out_std, row_ids=row_ids)


class ModernBertMLM(MaskedLM):
  """ModernBERT encoder + the MLM head of `heads.MaskedLM` (tied to the token embeddings); the interface of
  `bert.BertMLM`. `encode` returns the last hidden states (after the final norm). `token_type_ids` is accepted
  and ignored (ModernBERT has no token types).
  """

  def setup(self):
    c = self.config.resolved
    if c.hidden_size % c.num_heads:
      raise ValueError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}')
    check_config(self.config)
    norm = functools.partial(layers.norm, c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype,
                             dtype=c.compute_dtype)
    self.word_embeddings = nn.Embed(c.vocab_size, c.embedding_width, param_dtype=c.param_jnp_dtype,
                                    embedding_init=nn.initializers.normal(c.initializer_range))
    self.embeddings_norm = norm()
    self.embeddings_dropout = Dropout(c.hidden_dropout)
    # Embeddings of another width (`model.embedding_size`: an ELECTRA generator sharing a wider discriminator's
    # embeddings) are projected to the hidden size, as BERT's `embeddings_project`; not in Hugging Face ModernBERT.
    self.embeddings_project = (None if c.embedding_width == c.hidden_size else Dense(
        c.hidden_size, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype, init_std=c.initializer_range))
    # remat: keep each layer's input only and recompute the rest; `deterministic` (argument 5, counting self) is static.
    layer = nn.remat(Layer, static_argnums=(5,)) if c.remat else Layer
    self.layers = [layer(c, i, name=f'layer_{i}') for i in range(c.num_layers)]
    self.final_norm = norm()
    self.setup_head(c.initializer_range / math.sqrt(2.0 * c.num_layers))

  def encode(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, deterministic: bool = True,
             row_ids: jax.Array | None = None) -> jax.Array:
    del token_type_ids  # no token types in ModernBERT
    c = self.config.resolved
    length = input_ids.shape[-1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    x = self.embeddings_dropout(self.embeddings_norm(self.word_embeddings(input_ids)), deterministic=deterministic,
                                row_ids=row_ids)
    if self.embeddings_project is not None:
      x = self.embeddings_project(x)
    biases = {'full_attention': layers.attention_bias(segment_ids),
              'sliding_attention': layers.attention_bias(segment_ids, window=c.local_attention)}
    head_dim = c.hidden_size // c.num_heads
    thetas = {'full_attention': c.global_rope_theta, 'sliding_attention': c.local_rope_theta}
    types = layer_types(c)
    rope = {t: rope_tables(positions, head_dim, thetas[t], c.max_position_embeddings) for t in set(types)}
    for layer, kind in zip(self.layers, types):
      x = layer(x, biases[kind], *rope[kind], deterministic, row_ids)
    return self.final_norm(x)


MODEL = ModernBertMLM
