"""The MLM head the architectures share: hidden states at the masked positions → dense → activation → norm →
vocabulary logits through the word embeddings (tied) or an own `decoder` [vocab, hidden], plus `head_bias`.

`MaskedLM` is the base of `bert.BertMLM` and `modernbert.ModernBertMLM`: a subclass builds its encoder in
`setup` (its token embedding named `word_embeddings`, then `setup_head`) and defines `encode`; `__call__` and
`decode` are this class's, and so are the head's param names (`head_transform`, `head_norm`, `head_bias`,
`decoder`) that the Hugging Face mappings read.
"""

import flax.linen as nn
import jax

from mlm_flax.models import layers
from mlm_flax.models.config import ModelConfig


class MaskedLM(nn.Module):
  """Encoder (the subclass's `encode`) + MLM head.

  `__call__` returns logits [batch, P, vocab] at `masked_positions` [batch, P] (training computes the head only
  where predictions are scored), or at every position when `masked_positions` is None. `row_ids` [batch]
  (optional): the rows' indices in the global batch, from which dropout draws (see `layers.Dropout`).
  """
  config: ModelConfig

  def setup_head(self, transform_std: float) -> None:
    """Builds the head (call it at the end of `setup`): its switches (`classifier_bias`, `norm`, `norm_bias`,
    `decoder_bias`, `tie_word_embeddings`) from the resolved config; `transform_std`: the dense layer's init."""
    c = self.config.resolved
    self.head_transform = layers.Dense(c.hidden_size, dtype=c.compute_dtype, param_dtype=c.param_jnp_dtype,
                                       use_bias=c.classifier_bias, init_std=transform_std)
    self.head_norm = layers.norm(c.norm, c.layer_norm_eps, c.norm_bias, c.param_jnp_dtype)
    self.head_bias = (self.param('head_bias', nn.initializers.zeros, (c.vocab_size,), c.param_jnp_dtype)
                      if c.decoder_bias else None)
    # An untied decoder [vocab, hidden] (Hugging Face `tie_word_embeddings=False`); tied by default.
    self.decoder = (None if c.tie_word_embeddings else self.param(
        'decoder', nn.initializers.normal(c.initializer_range), (c.vocab_size, c.hidden_size), c.param_jnp_dtype))

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
    return logits if self.head_bias is None else logits + self.head_bias
