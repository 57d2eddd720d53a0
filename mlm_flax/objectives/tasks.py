"""Fine-tuning losses: softmax cross-entropy (classification), squared error (regression) and cross-entropy over
the scored tokens (token classification: labels other than -100), and (CE(start) + CE(end)) / 2 (question
answering), as the Hugging Face `*For*Classification` / `*ForQuestionAnswering` models compute them.

`task_loss` returns summed values and the count they are summed over, like `mlm.mlm_loss`, so a batch split
over devices and an evaluation batch with padding rows (weight 0) give exact means; `task_loss_rows` gives them
per row, for an evaluation whose sums do not depend on the batch size.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

IGNORE = -100  # token labels that are not scored (== mlm_flax.tasks.data.IGNORE)


def span_scored(positions: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """Hugging Face's QA targets: positions clamped to [0, length], `length` ignored; (targets, scored as f32)."""
  positions = jnp.clip(positions, 0, length)
  return jnp.where(positions < length, positions, 0), (positions < length).astype(jnp.float32)


def span_loss_rows(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row (loss sum, count) of question answering: `logits` [b, l, 2] (start, end), `labels` [b, 2] token
  positions. Each of start and end weighs 1/2, so the mean is HF's (CE(start) + CE(end)) / 2 when both are
  scored (positions outside the window are ignored, negative ones clamped to 0, as HF)."""
  loss = count = 0.0
  for k in range(2):
    target, scored = span_scored(labels[:, k], logits.shape[1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[..., k], target)
    loss, count = loss + 0.5 * ce * scored, count + 0.5 * scored
  return loss, count


def task_loss_rows(logits: jax.Array, labels: jax.Array, task: str) -> tuple[jax.Array, jax.Array]:
  """Per-row (loss sum, count) [b]: `logits` [b, num_labels] or [b, l, num_labels] (token task, QA), `labels`
  [b] (class index or float score), [b, l] (-100: not scored) or [b, 2] (QA: start and end positions)."""
  logits = logits.astype(jnp.float32)
  if task == 'question_answering':
    return span_loss_rows(logits, labels)
  if task == 'regression':
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32)), jnp.ones(labels.shape, jnp.float32)
  if task == 'token_classification':
    scored = (labels != IGNORE).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labels == IGNORE, 0, labels))
    return jnp.sum(ce * scored, axis=-1), jnp.sum(scored, axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), jnp.ones(labels.shape, jnp.float32)


def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, task: str) -> dict[str, jax.Array]:
  """{'loss_sum', 'count'} over the batch (rows weighted by `weights` [b]: 0 for padding rows); the mean loss is
  loss_sum / count: over examples, or over scored tokens for token classification."""
  loss, count = task_loss_rows(logits, labels, task)
  return {'loss_sum': jnp.sum(loss * weights), 'count': jnp.sum(count * weights)}


def predictions(logits: jax.Array, task: str) -> jax.Array:
  """Predicted class indices ([b] or [b, l]), the scores for regression ([b], f32), or the start/end logits for
  question answering ([b, l, 2], f32: spans are picked over windows on the host, `tasks.qa`)."""
  if task == 'question_answering':
    return logits.astype(jnp.float32)
  if task == 'regression':
    return logits[:, 0].astype(jnp.float32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TaskObjective:
  """A fine-tuning task's loss in the objective interface (`mlm_flax.objectives`) that `train.train_step` takes:
  the mean loss over the global batch's examples (or scored tokens), dropout drawn per global row."""
  model: Any
  task: str

  def prepare(self, rng: jax.Array, batch: dict[str, jax.Array], step: jax.Array) -> tuple[None, dict]:
    labels = batch['labels']  # the loss is over examples, or scored tokens for token classification
    count = jnp.sum(labels != IGNORE) if self.task == 'token_classification' else labels.shape[0]
    if self.task == 'question_answering':
      length = batch['input_ids'].shape[1]
      count = sum(0.5 * jnp.sum(span_scored(labels[:, k], length)[1]) for k in range(2))
    return None, {'count': jnp.asarray(count, jnp.float32)}

  def loss(self, params: Any, batch: dict[str, jax.Array], aux: None, totals: dict,
           rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits = self.model.apply({'params': params}, batch['input_ids'], batch['segment_ids'],
                              batch['token_type_ids'], deterministic=rng is None, row_ids=batch.get('row_ids'),
                              rngs=None if rng is None else {'dropout': rng})
    sums = task_loss(logits, batch['labels'], jnp.ones(batch['input_ids'].shape[:1], jnp.float32), self.task)
    return sums['loss_sum'] / jnp.maximum(totals['count'], 1.0), sums

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    return {'loss': float(sums['loss_sum']) / max(float(sums['count']), 1.0)}
