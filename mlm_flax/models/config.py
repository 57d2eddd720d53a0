"""`ModelConfig`: every `model.*` key with its default, once (as flax's lm1b `TransformerConfig`).

`configs/default.py` builds its `model` ConfigDict from `dataclasses.asdict(ModelConfig())`, so a default lives
here and nowhere else; model code takes a `ModelConfig` (attribute access, frozen, hashable: a linen module
attribute and a static jit argument) built by `ModelConfig.from_dict` from a run's `model` config, and reads the
architecture switches from `.resolved` (None replaced by the type's own value, `OWN`). Pure Python:
importing it does not import JAX (configs and validation stay fast).
"""

import dataclasses
import functools
from typing import Any, Mapping

# Keys whose default is None (filled from the tokenizer, or "the architecture's own"): the type their values
# take, for the config's FieldReferences (a None default otherwise accepts no typed override).
OPTIONAL_TYPES = {'vocab_size': int, 'embedding_size': int, 'pad_token_id': int, 'vocab_multiple': int,
                  'mlp': str, 'norm': str, 'positions': str, 'norm_position': str, 'attention_bias': bool,
                  'mlp_bias': bool, 'norm_bias': bool, 'decoder_bias': bool, 'classifier_bias': bool}
BIASES = ('attention_bias', 'mlp_bias', 'norm_bias', 'decoder_bias', 'classifier_bias')
# The architecture switches: None means the architecture's own value (`OWN`), resolved by `ModelConfig.resolved`.
SWITCHES = ('mlp', 'norm', 'positions', 'norm_position', *BIASES)
_BERT = dict(mlp='gelu', norm='layernorm', positions='learned', norm_position='post', attention_bias=True,
             mlp_bias=True, norm_bias=True, decoder_bias=True, classifier_bias=True)
# Each model type's own value of every switch (one entry per type of `mlm_flax.models.ARCHITECTURES`).
OWN = {'bert': _BERT, 'roberta': _BERT, 'electra': _BERT,
       'modernbert': dict(mlp='geglu', norm='layernorm', positions='rope', norm_position='pre', attention_bias=False,
                          mlp_bias=False, norm_bias=False, decoder_bias=True, classifier_bias=False)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model` sub-config: architecture, sizes, precision and per-architecture options."""
  # A key of `mlm_flax.models.ARCHITECTURES`: 'bert', 'roberta' (position offset), 'electra' (BERT with Hugging
  # Face ELECTRA's names and classification head) or 'modernbert'.
  type: str = 'bert'
  num_layers: int = 4
  hidden_size: int = 256
  # Width of the token, position and token-type embeddings (and of the MLM head's transform, norm and tied
  # decoder); None: hidden_size. Another width adds `embeddings_project` (embedding_size -> hidden_size), as
  # Hugging Face ELECTRA: a small ELECTRA generator shares the discriminator's embeddings. BERT/RoBERTa only.
  embedding_size: int | None = None
  num_heads: int = 4
  intermediate_size: int = 1024
  vocab_size: int | None = None  # None: from the tokenizer
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12  # the epsilon of every norm (LayerNorm or RMSNorm)
  hidden_act: str = 'gelu'  # exact erf GELU, as BERT; the activation of the MLP ('gelu', 'geglu') and the head
  # Architecture switches, for ablations on any type; None: the architecture's own (`OWN`: BERT/RoBERTa
  # gelu, layernorm, learned, post, every bias; ModernBERT geglu, layernorm, rope, pre, the decoder's bias only).
  # Values a Hugging Face class cannot represent train, evaluate and fill masks; `export` refuses them.
  # MLP: 'gelu': dense, hidden_act, dense; 'geglu': hidden_act(x W_in) * (x W_gate), 'swiglu': silu(x W_in) *
  # (x W_gate) (Shazeer 2020), whose `intermediate` makes 2 * intermediate_size features split (input, gate).
  mlp: str | None = None
  norm: str | None = None  # 'layernorm' or 'rmsnorm' (a scale, no shift; eps layer_norm_eps)
  # 'learned': position embeddings (BERT/RoBERTa only); 'rope': rotary embeddings on queries and keys in every
  # layer, base global_rope_theta (ModernBERT: per layer type). Positions restart per packed document either way.
  positions: str | None = None
  # 'post': BERT/RoBERTa layout (Hugging Face compatible); 'pre': pre-LN layers + a final norm, which tolerates
  # higher learning rates (Xiong et al. 2020). ModernBERT is pre-LN by definition ('post' is an error).
  norm_position: str | None = None
  initializer_range: float = 0.02
  pad_token_id: int | None = None  # None: from the tokenizer
  # 'bfloat16': bf16 matmul inputs, f32 accumulation, f32 master params; 'auto' picks per backend
  # (see `layers.resolve_dtype`).
  dtype: str = 'auto'
  param_dtype: str = 'float32'
  # 'auto': jax.nn.dot_product_attention (fused kernels) on GPU/TPU, heads-major einsums on CPU (faster
  # there); or 'einsum' / 'dot_product_attention'. Training with attention_dropout > 0 uses the einsums.
  attention: str = 'auto'
  # The head's matmul runs on the vocabulary padded (zero rows) to a multiple of this, aligned for GPU
  # tensor cores / TPU MXUs; logits, params and exports keep the real size. 1 turns it off; None: 128 on
  # GPU/TPU, 1 on CPU (nothing to align there; `layers.resolve_vocab_multiple`).
  vocab_multiple: int | None = None
  remat: bool = False  # recompute each layer in the backward pass: less activation memory, ~1/3 more FLOPs
  tie_word_embeddings: bool = True  # False: the MLM decoder is its own [vocab, hidden] param (HF untied)
  # ModernBERT (model.type='modernbert'; BERT/RoBERTa ignore these but global_rope_theta, their RoPE base with
  # positions='rope'). Each layer attends to its whole document ('full_attention') or to the tokens at most
  # local_attention // 2 away ('sliding_attention').
  layer_types: str = ''  # comma-separated, one per layer; '': every global_attn_every_n_layers-th layer full
  global_attn_every_n_layers: int = 3  # from layer 0 (Hugging Face's rule); the others sliding
  local_attention: int = 128  # the whole sliding window, half on each side (Hugging Face's definition)
  global_rope_theta: float = 160_000.0  # RoPE base of full-attention layers (and of BERT's with positions='rope')
  local_rope_theta: float = 10_000.0  # RoPE base of sliding-window layers
  # Bias switches; None: the architecture's own (BERT: all; ModernBERT: only the decoder's).
  attention_bias: bool | None = None  # QKV and attention output
  mlp_bias: bool | None = None
  norm_bias: bool | None = None  # LayerNorm shift (RMSNorm has none)
  decoder_bias: bool | None = None  # MLM decoder (tied embedding)
  classifier_bias: bool | None = None  # the head's dense layer

  @classmethod
  def from_dict(cls, model_cfg: Mapping[str, Any]) -> 'ModelConfig':
    """From a `model` config (ConfigDict or dict); missing keys take their defaults (an older config.json).

    Raises ValueError naming an unknown key and listing the valid ones.
    """
    values = upgraded(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg))
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f'unknown model config key {unknown[0]!r} (model.{unknown[0]}); valid keys: '
                       f'{", ".join(names)}.')
    return cls(**values)

  @functools.cached_property
  def resolved(self) -> 'ModelConfig':
    """This config with every None switch (`SWITCHES`) set to its architecture's own value (`OWN`)."""
    own = OWN.get(self.type, {})
    values = {k: v for k, v in own.items() if getattr(self, k) is None}
    return dataclasses.replace(self, **values) if values else self

  @functools.cached_property
  def compute_dtype(self) -> Any:
    """`dtype` as a jnp.dtype, 'auto' resolved for this backend and CPU."""
    from mlm_flax.models import layers  # pylint: disable=g-import-not-at-top  # JAX only when a model is built
    return layers.resolve_dtype(self.dtype)

  @functools.cached_property
  def param_jnp_dtype(self) -> Any:
    """`param_dtype` as a jnp.dtype."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.param_dtype)

  @property
  def embedding_width(self) -> int:
    """The embeddings' width: `embedding_size`, or `hidden_size` when unset."""
    return self.hidden_size if self.embedding_size is None else self.embedding_size

  @property
  def position_offset(self) -> int:
    return position_offset(self)


def position_offset(model_cfg: Any) -> int:
  """RoBERTa numbers positions after the padding index; BERT from 0. Takes a `ModelConfig` or a `model` config."""
  get = (lambda k: getattr(model_cfg, k)) if isinstance(model_cfg, ModelConfig) else model_cfg.__getitem__
  return get('pad_token_id') + 1 if get('type') == 'roberta' else 0


def upgraded(model_cfg: Mapping[str, Any]) -> dict:
  """A `model` config as a dict in today's meaning. Written before the architecture switches (no `mlp` key),
  it says norm_position='post' for every type, which ModernBERT (pre-LN by definition) ignored: None there."""
  values = dict(model_cfg)
  if 'mlp' not in values and values.get('type') == 'modernbert' and values.get('norm_position') == 'post':
    values['norm_position'] = None
  return values


# Keys only ModernBERT reads (its attention pattern and per-layer RoPE bases); `global_rope_theta` is also the
# RoPE base of other types with positions='rope'.
MODERNBERT_ONLY = ('layer_types', 'global_attn_every_n_layers', 'local_attention', 'local_rope_theta',
                   'global_rope_theta')


def unused_keys(model_cfg: Mapping[str, Any]) -> tuple[str, ...]:
  """The `model` keys that the config's architecture never reads (a changed value changes nothing), e.g.
  `local_attention` of a BERT; compared configs skip them."""
  if model_cfg.get('type', 'bert') == 'modernbert':
    return ()
  rope = resolved_switches(model_cfg)['positions'] == 'rope'
  return tuple(k for k in MODERNBERT_ONLY if not (rope and k == 'global_rope_theta'))


def resolved_switches(model_cfg: Mapping[str, Any]) -> dict:
  """{switch: value} of a `model` config (a dict, possibly from an older config.json), None resolved to its
  type's own value as `ModelConfig.resolved` does; for comparing runs' architectures without building a model."""
  values = upgraded(model_cfg)
  own = OWN.get(values.get('type', 'bert'), {})
  return {k: own.get(k) if values.get(k) is None else values[k] for k in SWITCHES}
