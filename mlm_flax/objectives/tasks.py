"""Fine-tuning losses: softmax cross-entropy (classification), squared error (regression) and cross-entropy over
the scored tokens (token classification: labels other than -100), as the Hugging Face `*For*Classification`
models compute them.

`task_loss` returns summed values and the count they are summed over, like `mlm.mlm_loss`, so a batch split
over devices or micro-batches, and an evaluation batch with padding rows (weight 0), give exact means.
"""

import jax
import jax.numpy as jnp
import optax

IGNORE = -100  # token labels that are not scored (== mlm_flax.tasks.data.IGNORE)


def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, task: str) -> dict[str, jax.Array]:
  """{'loss_sum', 'count'} over the batch: `logits` [b, num_labels] or [b, l, num_labels] (token task),
  `labels` [b] (class index or float score) or [b, l], `weights` [b] (0 for padding rows)."""
  logits = logits.astype(jnp.float32)
  if task == 'regression':
    per_row = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    return {'loss_sum': jnp.sum(per_row * weights), 'count': jnp.sum(weights)}
  if task == 'token_classification':
    scored = (labels != IGNORE) * weights[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labels == IGNORE, 0, labels))
    return {'loss_sum': jnp.sum(ce * scored), 'count': jnp.sum(scored)}
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'loss_sum': jnp.sum(ce * weights), 'count': jnp.sum(weights)}


def predictions(logits: jax.Array, task: str) -> jax.Array:
  """Predicted class indices ([b] or [b, l]), or the scores for regression ([b], f32)."""
  if task == 'regression':
    return logits[:, 0].astype(jnp.float32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
