"""ELECTRA (Clark et al. 2020): replaced-token detection with a small MLM generator.

A generator (a masked LM of the discriminator's architecture, `generator_hidden_fraction` as wide; any
architecture: BERT, RoBERTa, ELECTRA or ModernBERT) fills the
masked positions with samples from its own predictions (no gradient through sampling); the discriminator reads
the original ids with those samples in place and predicts, for every real token, whether it was replaced (a sample
equal to the original counts as original, as in the paper). Loss = generator MLM loss + `disc_weight` (λ = 50)
· discriminator loss. Both share the whole embeddings block (word, position and token-type embeddings and their
norm), as the original code and Hugging Face's `ElectraForMaskedLM` do: the generator's embeddings are the
discriminator's embedding width (`model.embedding_size`) followed by its `embeddings_project`.

Params: `{'generator': masked LM params minus the shared embeddings, 'discriminator': {'encoder', 'head'}}`
(`generator_params` puts the shared embeddings back, so both losses' gradients reach them). Metrics are sums,
additive over micro-batches, steps and hosts, as `mlm.mlm_loss`'s; the losses are normalised by the *global*
counts passed in, so summing micro-batch gradients gives the full batch's gradient exactly.
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlm_flax.models import ModelConfig, architecture, heads, make_model
from mlm_flax.models.config import resolved_switches
from mlm_flax.objectives import mlm
from mlm_flax.objectives.masking import Masked

# `objective.*` keys of ELECTRA and their defaults (the paper's: a quarter-width generator, λ = 50).
DEFAULTS = {'generator_hidden_fraction': 0.25, 'generator_layers_fraction': 1.0, 'disc_weight': 50.0}
# The embeddings block the generator takes from the discriminator's encoder (those the architecture has).
SHARED = ('word_embeddings', 'position_embeddings', 'token_type_embeddings', 'embeddings_norm')


def option(objective: Mapping[str, Any] | None, key: str) -> Any:
  """`objective[key]` (a ConfigDict or dict; None or a missing key: `DEFAULTS[key]`)."""
  value = None if objective is None else objective.get(key)
  return DEFAULTS[key] if value is None else value


def _as_dict(model: Mapping[str, Any] | ModelConfig) -> dict:
  if isinstance(model, ModelConfig):
    return {k: getattr(model, k) for k in model.__dataclass_fields__}
  return dict(model.to_dict() if hasattr(model, 'to_dict') else model)


def generator_model_config(model: Mapping[str, Any] | ModelConfig, objective: Mapping[str, Any] | None) -> dict:
  """The generator's `model` config: `generator_hidden_fraction` of the discriminator's width, heads and
  intermediate size (heads at least 1 and dividing the width, as the original's max(1, ...)),
  `generator_layers_fraction` of its layers, and the discriminator's embedding width (embeddings shared)."""
  m = _as_dict(model)
  frac = float(option(objective, 'generator_hidden_fraction'))
  hidden = max(1, int(round(m['hidden_size'] * frac)))
  num_heads = max(1, int(round(m['num_heads'] * frac)))
  rope = resolved_switches(m)['positions'] == 'rope'
  while num_heads > 1 and (hidden % num_heads or (rope and (hidden // num_heads) % 2)):  # RoPE: even head size
    num_heads -= 1
  layers = max(1, int(round(m['num_layers'] * float(option(objective, 'generator_layers_fraction')))))
  out = dict(m, hidden_size=hidden, num_heads=num_heads, num_layers=layers,
             intermediate_size=max(1, int(round(m['intermediate_size'] * frac))),
             embedding_size=m.get('embedding_size') or m['hidden_size'])
  if m.get('layer_types'):  # an explicit per-layer list (ModernBERT): the discriminator's first `layers`
    out['layer_types'] = ','.join(t.strip() for t in m['layer_types'].split(',')[:layers])
  return out


class Discriminator(nn.Module):
  """The architecture's encoder (`MODEL(mlm_head=False)`, params under `encoder`) + `heads.DiscriminatorHead`
  (`head`): one replaced-token logit [batch, len] per token, in f32."""
  config: ModelConfig

  def setup(self):
    self.encoder = architecture(self.config.type).MODEL(self.config, mlm_head=False)
    self.head = heads.DiscriminatorHead(self.config)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               row_ids: jax.Array | None = None) -> jax.Array:
    return self.head(self.encoder.encode(input_ids, segment_ids, positions, token_type_ids, deterministic, row_ids))


def make_models(model_cfg: Mapping[str, Any] | ModelConfig,
                objective: Mapping[str, Any] | None) -> tuple[nn.Module, Discriminator]:
  """(generator, discriminator) linen modules of the discriminator's `model` config and the `objective` config."""
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(_as_dict(model_cfg))
  generator = make_model(generator_model_config(cfg, objective))
  cfg.resolved.compute_dtype  # pylint: disable=pointless-statement  # resolve 'auto' now, as make_model does
  return generator, Discriminator(cfg)


def init_params(rng: jax.Array, model_cfg: Mapping[str, Any] | ModelConfig, objective: Mapping[str, Any] | None,
                seq_len: int) -> dict:
  """Fresh `{'generator': ..., 'discriminator': {'encoder', 'head'}}`; the generator's tree has no `SHARED`
  embeddings (`generator_params` takes the discriminator's)."""
  generator, discriminator = make_models(model_cfg, objective)
  ids = jnp.zeros((1, seq_len), jnp.int32)
  gen_rng, disc_rng = jax.random.split(rng)
  disc = jax.jit(discriminator.init)(disc_rng, ids, jnp.ones_like(ids))['params']
  gen = jax.jit(generator.init)(gen_rng, ids, jnp.ones_like(ids))['params']
  return {'generator': {k: v for k, v in gen.items() if k not in SHARED}, 'discriminator': disc}


def generator_params(params: Mapping[str, Any]) -> dict:
  """The generator's whole masked-LM params: its own, and the discriminator's embeddings (`SHARED`)."""
  encoder = params['discriminator']['encoder']
  return {**params['generator'], **{k: encoder[k] for k in SHARED if k in encoder}}


def _sample(sample_rng: jax.Array, logits: jax.Array, row_ids: jax.Array) -> jax.Array:
  """Token ids [batch, P] drawn from the generator's f32 `logits` (no gradient), row `i` from
  `fold_in(sample_rng, row_ids[i])`: a row draws the same tokens in any micro-batch."""
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  draw = lambda row, row_logits: jax.random.categorical(jax.random.fold_in(sample_rng, row), row_logits)
  return jax.vmap(draw)(row_ids, logits)


def _replaced(masked: Masked, positions: jax.Array, weights: jax.Array, samples: jax.Array) -> jax.Array:
  """The original ids with the samples at the scored `positions` (weight > 0)."""
  rows = jnp.arange(positions.shape[0])[:, None]
  original = jnp.take_along_axis(masked.targets, positions, axis=1)
  return masked.targets.at[rows, positions].set(jnp.where(weights > 0, samples, original).astype(masked.targets.dtype))


def _forward(params: Any, generator: nn.Module, discriminator: nn.Module, batch: dict[str, jax.Array],
             masked: Masked, num_predictions: int, sample_rng: jax.Array,
             dropout_rng: jax.Array | None) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
  """Generator sums (`mlm.prediction_sums`), discriminator logits [batch, len], labels (1: replaced) and
  weights (1: a real token) of one batch."""
  positions, targets, weights = mlm.gather_predictions(masked, num_predictions)
  gen_rng, disc_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  logits = mlm.masked_logits(generator_params(params), generator, batch, masked, positions, gen_rng)
  row_ids = batch.get('row_ids', jnp.arange(masked.targets.shape[0]))
  disc_ids = _replaced(masked, positions, weights, _sample(sample_rng, logits, row_ids))
  disc_logits = discriminator.apply(
      {'params': params['discriminator']}, disc_ids, batch['segment_ids'], batch['positions'],
      deterministic=disc_rng is None, row_ids=batch.get('row_ids'),
      rngs=None if disc_rng is None else {'dropout': disc_rng})
  labels = (disc_ids != masked.targets).astype(jnp.float32)
  return mlm.prediction_sums(logits, targets, weights), disc_logits, labels, (batch['segment_ids'] > 0).astype(
      jnp.float32)


def batch_counts(batch: dict[str, jax.Array], masked: Masked) -> tuple[jax.Array, jax.Array]:
  """(gen_count, disc_count) of a whole batch (f32): its scored masked tokens and its real tokens
  (`segment_ids > 0`); computed once per step and passed to every micro-batch's `electra_loss`."""
  return masked.weights.sum(), (batch['segment_ids'] > 0).sum().astype(jnp.float32)


def electra_loss(params: Any, generator: nn.Module, discriminator: nn.Module, batch: dict[str, jax.Array],
                 masked: Masked, num_predictions: int, sample_rng: jax.Array, dropout_rng: jax.Array | None,
                 disc_weight: float, gen_count: jax.Array, disc_count: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """gen_loss_sum / gen_count + disc_weight · disc_loss_sum / disc_count, and summed metrics.

  `masked`: the masking function's output on `batch['input_ids']`; `num_predictions`: its static budget.
  `gen_count` / `disc_count`: the masked / real (`segment_ids > 0`) tokens of the *whole* batch (at least 1
  is used), so micro-batch gradients sum to the batch's. Sampling draws per row from
  `fold_in(sample_rng, batch['row_ids'])`; dropout (on iff `dropout_rng`) per row as `mlm.mlm_loss`.
  Metrics: `loss_sum`, `count`, `correct` (generator, as `mlm.mlm_loss`), `disc_loss_sum`, `disc_count`,
  `disc_correct`, `replaced` (replaced real tokens) and `replaced_correct` (of those, detected).
  """
  sums, logits, labels, weights = _forward(params, generator, discriminator, batch, masked, num_predictions,
                                           sample_rng, dropout_rng)
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  predicted = (logits > 0).astype(jnp.float32)
  sums.update(disc_loss_sum=(bce * weights).sum(), disc_count=weights.sum(),
              disc_correct=((predicted == labels) * weights).sum(), replaced=(labels * weights).sum(),
              replaced_correct=(predicted * labels * weights).sum())
  loss = (sums['loss_sum'] / jnp.maximum(gen_count, 1.0)
          + disc_weight * sums['disc_loss_sum'] / jnp.maximum(disc_count, 1.0))
  return loss, sums


def disc_predictions(params: Any, generator: nn.Module, discriminator: nn.Module, batch: dict[str, jax.Array],
                     masked: Masked, num_predictions: int,
                     sample_rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token replaced probabilities [batch, len] (f32), labels (1: replaced) and weights (1: a real token) of
  an evaluation batch (no dropout), for `disc_auc`."""
  _, logits, labels, weights = _forward(params, generator, discriminator, batch, masked, num_predictions,
                                        sample_rng, None)
  return jax.nn.sigmoid(logits), labels, weights


def disc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
  """ROC AUC of the discriminator's `scores` against `labels` over the tokens with weight > 0 (host arrays of
  any shape, e.g. `disc_predictions`' concatenated over batches); nan when only one class occurs."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel()
  keep = np.ones(scores.shape, bool) if weights is None else np.asarray(weights).ravel() > 0
  if len(np.unique(labels[keep])) < 2:
    return float('nan')
  return float(metrics.roc_auc_score(labels[keep], scores[keep]))


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
  """Summed metrics → the generator's (`mlm.summarize`: loss, masked_accuracy, perplexity, num_masked_tokens)
  and the discriminator's: `disc_loss`, `disc_accuracy`, `replaced_fraction` (of real tokens), `replaced_recall`
  (replaced tokens detected), `num_disc_tokens`, `num_replaced_tokens`."""
  out = mlm.summarize(dict(sums))
  count, replaced = max(float(sums['disc_count']), 1.0), float(sums['replaced'])
  out.update(disc_loss=float(sums['disc_loss_sum']) / count, disc_accuracy=float(sums['disc_correct']) / count,
             replaced_fraction=replaced / count,
             replaced_recall=float(sums['replaced_correct']) / max(replaced, 1.0),
             num_disc_tokens=int(sums['disc_count']), num_replaced_tokens=int(replaced))
  return out


SAMPLE_STREAM = 0xE1EC  # evaluation's generator samples: fold_in(eval key, SAMPLE_STREAM), then the row index
AUC_BINS = np.linspace(-12.0, 12.0, 481)  # discriminator logits binned at 0.05 for the (additive) eval AUC


def _auc_histograms(params: Any, objective: 'Electra', batch: dict[str, jax.Array], masked: Masked,
                    num_predictions: int, sample_rng: jax.Array) -> dict[str, jax.Array]:
  """Per-bin counts of replaced / original real tokens by discriminator logit: sums that add over batches and
  hosts, from which `summarize` computes the AUC (ties within a 0.05-logit bin count one half)."""
  probs, labels, weights = disc_predictions(params, objective.generator, objective.discriminator, batch, masked,
                                            num_predictions, sample_rng)
  logits = jnp.log(probs) - jnp.log1p(-probs)
  index = jnp.clip(jnp.searchsorted(jnp.asarray(AUC_BINS), logits.ravel()), 0, len(AUC_BINS))
  hist = lambda w: jnp.zeros(len(AUC_BINS) + 1, jnp.float32).at[index].add(w.ravel())
  return {'auc_replaced': hist(labels * weights), 'auc_original': hist((1.0 - labels) * weights)}


def binned_auc(replaced: np.ndarray, original: np.ndarray) -> float:
  """ROC AUC from per-bin counts (ascending score bins): P(replaced scores above original), ties one half."""
  replaced, original = np.asarray(replaced, np.float64), np.asarray(original, np.float64)
  if not replaced.sum() or not original.sum():
    return float('nan')
  below = np.concatenate([[0.0], np.cumsum(original)[:-1]])
  return float((replaced * (below + 0.5 * original)).sum() / (replaced.sum() * original.sum()))


@dataclasses.dataclass(frozen=True)
class Electra:
  """ELECTRA in the objective interface (`mlm_flax.objectives`): the train step, evaluator and loop take it
  as they take `mlm.MLM`. Eval adds the discriminator's AUC (binned, `binned_auc`)."""
  generator: nn.Module
  discriminator: Discriminator
  mask_fn: mlm.MaskFn
  num_predictions: int | Callable[[int], int]
  model_cfg: dict
  objective_cfg: dict
  baseline_token: int | None = None  # eval: the unigram baseline of the generator's predictions

  def init_params(self, rng: jax.Array, seq_len: int) -> dict:
    return init_params(rng, self.model_cfg, self.objective_cfg, seq_len)

  def _totals(self, batch, masked: Masked, sample_rng: jax.Array) -> dict:
    gen_count, disc_count = batch_counts(batch, masked)
    return {'gen_count': gen_count, 'disc_count': disc_count, 'sample_rng': sample_rng}

  def prepare(self, rng: jax.Array, batch: dict[str, jax.Array], step: jax.Array) -> tuple[Masked, dict]:
    mask_rng, sample_rng = jax.random.split(rng)
    masked = self.mask_fn(mask_rng, batch['input_ids'], maskable=batch['segment_ids'] > 0, step=step)
    return masked, self._totals(batch, masked, sample_rng)

  def prepare_eval(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Masked, dict]:
    masked = mlm.mask_rows(self.mask_fn, rng, batch['row_ids'], batch['input_ids'], batch['segment_ids'] > 0)
    return masked, self._totals(batch, masked, jax.random.fold_in(rng, SAMPLE_STREAM))

  def loss(self, params: Any, batch: dict[str, jax.Array], masked: Masked, totals: dict,
           rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    n = self.num_predictions
    n = n(batch['input_ids'].shape[-1]) if callable(n) else n
    loss, sums = electra_loss(params, self.generator, self.discriminator, batch, masked, n, totals['sample_rng'],
                              rng, option(self.objective_cfg, 'disc_weight'), totals['gen_count'],
                              totals['disc_count'])
    if rng is None:  # evaluation: the AUC's histograms and the unigram baseline
      sums.update(_auc_histograms(params, self, batch, masked, n, totals['sample_rng']))
      if self.baseline_token is not None:
        _, targets, weights = mlm.gather_predictions(masked, n)
        sums['baseline_correct'] = ((targets == self.baseline_token) * weights).sum()
    return loss, sums

  def summarize(self, sums: dict) -> dict[str, float]:
    out = summarize({k: v for k, v in sums.items() if not k.startswith('auc_')})
    if 'auc_replaced' in sums:
      out['disc_auc'] = binned_auc(sums['auc_replaced'], sums['auc_original'])
    return out

  def mlm_model(self, params: Any) -> tuple[nn.Module, Any]:
    return self.generator, generator_params(params)


def make(config, tok, split: str = 'train') -> Electra:
  """The ELECTRA objective of a resolved config: generator and discriminator, and the masking of `split`."""
  model_cfg = _as_dict(config.model)
  objective_cfg = {k: config.objective.get(k) for k in DEFAULTS}
  generator, discriminator = make_models(model_cfg, objective_cfg)
  return Electra(generator, discriminator, *mlm.make_mask_fn(config, tok, split), model_cfg, objective_cfg)


def abstract_params(config) -> Any:
  """Shapes and dtypes of a run's params, without allocating them (restoring a checkpoint)."""
  objective_cfg = {k: config.objective.get(k) for k in DEFAULTS}
  return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), _as_dict(config.model), objective_cfg, 8))


def mlm_of(config, params: Any) -> tuple[dict, nn.Module, Any]:
  """The generator as a masked LM: its `model` config, module and params (fill-mask)."""
  objective_cfg = {k: config.objective.get(k) for k in DEFAULTS}
  gen_cfg = generator_model_config(_as_dict(config.model), objective_cfg)
  return gen_cfg, make_model(gen_cfg), generator_params(params)


def encoder_of(params: Any) -> Any:
  """The discriminator's encoder params (what fine-tuning starts from)."""
  return params['discriminator']['encoder']
