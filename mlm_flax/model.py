"""A BERT/RoBERTa-layout encoder with an MLM head (tied to the word embeddings by default), in Flax linen.

Post-LN Transformer layers named and shaped so Hugging Face BERT and RoBERTa
checkpoints map one-to-one (see `hf.py`). Params are kept in `param_dtype`
(f32); with `dtype=bfloat16` every matmul takes bf16 inputs and accumulates in
f32 (`preferred_element_type`), forward *and* backward (`mixed_einsum`), which
is what makes AMX CPUs, GPUs and TPUs fast. Norms, softmax and the residual
stream stay f32.

Packed rows carry `segment_ids` (1, 2, ... per document, 0 for padding):
attention stays inside a document; `positions` restart per document.
"""

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any


def _transpose_specs(spec: str) -> tuple[str, str]:
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  for i in set(a + b + out) - {'.'}:
    if (i in a) + (i in b) + (i in out) < 2:
      raise ValueError(f'mixed_einsum needs every index in at least two operands: {spec}')
  return f'{out},{b}->{a}', f'{a},{out}->{b}'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)


def _bf16_einsum_fwd(spec, a, b):
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out = jnp.einsum(spec, a16, b16, preferred_element_type=jnp.float32)
  # Zero-size carriers remember the primal dtypes for the cotangents.
  return out, (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _bf16_einsum_bwd(spec, res, g):
  a16, b16, a_dtype, b_dtype = res
  spec_a, spec_b = _transpose_specs(spec)
  g16 = g.astype(jnp.bfloat16)  # bf16 cotangent, f32 accumulation: the fast path backward too
  da = jnp.einsum(spec_a, g16, b16, preferred_element_type=jnp.float32)
  db = jnp.einsum(spec_b, a16, g16, preferred_element_type=jnp.float32)
  return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
  """einsum in `dtype` with f32 accumulation and f32 output; bf16 has a matching fast backward."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    _transpose_specs(spec)
    inputs, out = spec.split('->')
    batched = set(inputs.split(',')[0]) & set(inputs.split(',')[1]) & set(out) - {'.'}
    if not (batched and jax.default_backend() == 'cpu'):  # XLA:CPU lacks batched bf16 x bf16 -> f32 dots
      return _bf16_einsum(spec, a, b)
    dtype = jnp.float32
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class Dense(nn.Module):
  """`y = x @ kernel + bias` through `mixed_einsum` (`use_bias=False`: no bias param)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.normal(self.init_std),
                        (x.shape[-1], self.features), self.param_dtype)
    # A 2-D dot: XLA:CPU differentiates '...k,kn->...n' on 3-D inputs ~1.8x slower.
    y = mixed_einsum('mk,kn->mn', x.reshape(-1, x.shape[-1]), kernel, self.dtype)
    y = y.reshape(*x.shape[:-1], self.features)
    if not self.use_bias:
      return y
    return y + self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)


class Dropout(nn.Module):
  """Inverted dropout from 16 random bits per element, two elements per 32-bit draw, drawn per row.

  `nn.Dropout` draws 32 bits per element; random bits are most of dropout's cost (XLA:CPU's threefry makes
  ~50-70 M words/s, and attention-probability dropout needs batch*heads*len^2 per layer), so this halves it.
  The keep probability is exact to 2^-16. Row `i` of `x` draws from `fold_in(key, row_ids[i])` (default:
  its index), so a row's mask does not depend on which micro-batch or device holds it: give the rows'
  indices in the global batch and gradient accumulation gets the full batch's dropout (same threefry work).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, row_ids: jax.Array | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    key, last = self.make_rng('dropout'), x.shape[-1]
    row_ids = jnp.arange(x.shape[0]) if row_ids is None else row_ids
    shape = (*x.shape[1:-1], (last + 1) // 2)
    bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), shape, jnp.uint32))(row_ids)
    halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :last]
    keep = halves >= jnp.uint32(round(self.rate * 65536))
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


def _activation(name: str):
  return {'gelu': functools.partial(jax.nn.gelu, approximate=False),
          'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
          'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
          'relu': jax.nn.relu, 'silu': jax.nn.silu}[name]


def _use_dot_product_attention(mode: str, dropout: float, deterministic: bool) -> bool:
  """'auto': `jax.nn.dot_product_attention` on GPU/TPU; on CPU the heads-major einsums, ~3x faster there.

  The fused kernel has no attention-probability dropout, so training with `attention_dropout` > 0
  keeps the einsum path (inference never needs it).
  """
  if mode not in ('auto', 'einsum', 'dot_product_attention'):
    raise ValueError(f"model.attention={mode!r}; use 'auto', 'einsum' or 'dot_product_attention'.")
  if mode == 'einsum' or (dropout > 0 and not deterministic):
    return False
  return mode == 'dot_product_attention' or jax.default_backend() != 'cpu'


def attention_implementation(backend: str, dtype: Dtype, dropout_active: bool) -> str | None:
  """The `implementation` to ask `jax.nn.dot_product_attention` for: 'cudnn' (flash attention) on an NVIDIA
  GPU with bf16/fp16 compute and no attention dropout, which is what cuDNN's fused kernel supports; None
  (XLA's attention) elsewhere (CPU, TPU, ROCm, f32 compute)."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if backend in ('gpu', 'cuda') and half and not dropout_active else None


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Dtype,
                           dropout_active: bool) -> jax.Array:
  """`jax.nn.dot_product_attention` with cuDNN where `attention_implementation` picks it; XLA's attention
  when cuDNN refuses these inputs at trace time (head size, cuDNN version, no cuDNN, ...)."""
  implementation = attention_implementation(jax.default_backend(), dtype, dropout_active)
  if implementation is not None:
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    except (RuntimeError, ValueError, NotImplementedError) as e:
      logging.info('cuDNN attention unavailable here (%s); using XLA attention.', e)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)


class Layer(nn.Module):
  """One Transformer layer: post-LN as BERT/RoBERTa (default), or pre-LN (`norm_position='pre'`)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, deterministic: bool,
               row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype,
                              init_std=c.initializer_range)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, param_dtype=c.param_dtype)
    b, l, h = x.shape
    head_dim = h // c.num_heads
    pre = c.get('norm_position', 'post') == 'pre'
    inputs = x
    if pre:  # pre-LN: normalise the branch input, keep the residual stream un-normalised
      x = norm(name='attention_norm')(x)

    # Heads-major layout: batched dots over (batch, head) run ~3x faster than 'bqhd,bkhd' on CPU.
    q, k, v = (dense(h, name=n)(x).reshape(b, l, c.num_heads, head_dim).transpose(0, 2, 1, 3)
               for n in ('query', 'key', 'value'))
    use_dpa = _use_dot_product_attention(c.get('attention', 'auto'), c.attention_dropout, deterministic)
    if use_dpa:  # fused kernels (cuDNN flash attention on GPU) where the backend has them
      qkv = (t.transpose(0, 2, 1, 3).astype(c.dtype) for t in (q, k, v))
      context = _dot_product_attention(*qkv, attention_bias == 0, c.dtype,
                                       dropout_active=c.attention_dropout > 0 and not deterministic)
      context = context.astype(jnp.float32).reshape(b, l, h)
    else:
      scores = mixed_einsum('bhqd,bhkd->bhqk', q * head_dim ** -0.5, k, c.dtype) + attention_bias
      probs = jax.nn.softmax(scores, axis=-1)
      probs = Dropout(c.attention_dropout)(probs, deterministic=deterministic, row_ids=row_ids)
      context = mixed_einsum('bhqk,bhkd->bhqd', probs, v, c.dtype).transpose(0, 2, 1, 3).reshape(b, l, h)
    attn = Dropout(c.hidden_dropout)(dense(h, name='attention_output')(context),
                                     deterministic=deterministic, row_ids=row_ids)
    x = inputs + attn if pre else norm(name='attention_norm')(inputs + attn)

    y = norm(name='output_norm')(x) if pre else x
    y = _activation(c.hidden_act)(dense(c.intermediate_size, name='intermediate')(y))
    y = Dropout(c.hidden_dropout)(dense(h, name='output')(y), deterministic=deterministic, row_ids=row_ids)
    return x + y if pre else norm(name='output_norm')(x + y)


class BertMLM(nn.Module):
  """Encoder + MLM head tied to the word embeddings (or, with `tie_word_embeddings=False`, its own decoder).

  `__call__` returns logits [batch, P, vocab] at `masked_positions` [batch, P]
  (training computes the head only where predictions are scored), or at every
  position when `masked_positions` is None. `encode` returns the last hidden states. `row_ids` [batch]
  (optional) are the rows' indices in the global batch, from which dropout draws (see `Dropout`).
  """
  config: ml_collections.ConfigDict

  def setup(self):
    c = self.config
    if c.hidden_size % c.num_heads:
      raise ValueError(f'model.hidden_size={c.hidden_size} is not divisible by '
                       f'model.num_heads={c.num_heads}')
    init = nn.initializers.normal(c.initializer_range)
    embed = functools.partial(nn.Embed, embedding_init=init, param_dtype=c.param_dtype)
    self.word_embeddings = embed(c.vocab_size, c.hidden_size)
    self.position_embeddings = embed(c.max_position_embeddings, c.hidden_size)
    self.token_type_embeddings = embed(c.type_vocab_size, c.hidden_size)
    self.embeddings_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_dtype)
    self.embeddings_dropout = Dropout(c.hidden_dropout)
    # remat: keep only each layer's input for the backward pass and recompute the rest (less memory,
    # ~1/3 more compute); `deterministic` (argument 3, counting self) is static.
    layer = nn.remat(Layer, static_argnums=(3,)) if c.get('remat', False) else Layer
    self.layers = [layer(c, name=f'layer_{i}') for i in range(c.num_layers)]
    pre = c.get('norm_position', 'post') == 'pre'
    self.final_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_dtype) if pre else None
    self.head_transform = Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                init_std=c.initializer_range)
    self.head_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=c.param_dtype)
    self.head_bias = self.param('head_bias', nn.initializers.zeros, (c.vocab_size,), c.param_dtype)
    # An untied decoder [vocab, hidden] (Hugging Face `tie_word_embeddings=False`); tied by default.
    self.decoder = (None if c.get('tie_word_embeddings', True)
                    else self.param('decoder', init, (c.vocab_size, c.hidden_size), c.param_dtype))

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
    same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    attention_bias = jnp.where(same_doc, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    for layer in self.layers:
      x = layer(x, attention_bias, deterministic, row_ids)
    return self.final_norm(x) if self.final_norm is not None else x

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, masked_positions: jax.Array | None = None,
               deterministic: bool = True, row_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    x = self.encode(input_ids, segment_ids, positions, token_type_ids, deterministic, row_ids)
    if masked_positions is not None:
      x = jnp.take_along_axis(x, masked_positions[..., None], axis=1)
    x = self.head_norm(_activation(c.hidden_act)(self.head_transform(x)))
    return self.decode(x)

  def decode(self, x: jax.Array) -> jax.Array:
    """Vocabulary logits through the tied embeddings (or the untied `decoder`, same layout).

    The matmul runs on the embedding padded with zero rows to a multiple of `vocab_multiple`
    (aligned tiles for GPU tensor cores / TPU MXUs); the padded logits are sliced off, so params,
    checkpoints and Hugging Face exports keep the tokenizer's vocabulary size.
    """
    c = self.config
    embedding = self.word_embeddings.embedding if self.decoder is None else self.decoder
    vocab = embedding.shape[0]
    pad = -vocab % c.get('vocab_multiple', 1)
    if pad:
      embedding = jnp.pad(embedding, ((0, pad), (0, 0)))
    logits = mixed_einsum('bph,vh->bpv', x, embedding, c.dtype)
    return logits[..., :vocab] + self.head_bias


def _cpu_has_fast_bf16() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      flags = set(next((l for l in f if l.startswith('flags')), '').split())
  except OSError:
    return False
  return bool(flags & {'amx_bf16', 'avx512_bf16'})


def resolve_dtype(name: str) -> jnp.dtype:
  """'auto' is the fastest safe compute dtype here: bf16 (f32 accumulation) on TPU, GPU and
  CPUs with AMX/AVX512-BF16; f32 on other CPUs, where bf16 dots are emulated and slower."""
  if name != 'auto':
    return jnp.dtype(name)
  fast = jax.default_backend() in ('tpu', 'gpu', 'cuda', 'rocm') or _cpu_has_fast_bf16()
  return jnp.dtype(jnp.bfloat16 if fast else jnp.float32)


def position_offset(model_cfg) -> int:
  """RoBERTa numbers positions after the padding index; BERT from 0."""
  return model_cfg['pad_token_id'] + 1 if model_cfg['type'] == 'roberta' else 0


def _modernbert(config: ml_collections.FrozenConfigDict) -> nn.Module:
  from mlm_flax.models import modernbert  # pylint: disable=g-import-not-at-top  # builds on this module: no cycle
  return modernbert.ModernBertMLM(config)


# model.type -> a constructor taking the resolved (frozen) `model` config.
ARCHITECTURES = {'bert': BertMLM, 'roberta': BertMLM, 'modernbert': _modernbert}


def make_model(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """Builds the module of `model.type` from the `model` sub-config (dtypes given as names)."""
  c = model_cfg.to_dict()
  if c['type'] not in ARCHITECTURES:
    raise ValueError(f'model.type={c["type"]!r} is not one of {", ".join(ARCHITECTURES)}; pick one of those.')
  c['dtype'] = resolve_dtype(c['dtype'])
  c['param_dtype'] = jnp.dtype(c['param_dtype'])
  c['position_offset'] = position_offset(c)
  return ARCHITECTURES[c['type']](ml_collections.FrozenConfigDict(c))
