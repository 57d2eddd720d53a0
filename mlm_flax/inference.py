"""Inference: `load(...)` a trained model and `fill_mask(...)` like `transformers.pipeline("fill-mask")`."""

import dataclasses
import functools
import json
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax import checkpoint
from mlm_flax.model import make_model

_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass
class MLM:
  """Everything fill-mask needs: the resolved config, the params pytree, the tokenizer, the module."""
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  model: Any
  step: int = 0


def load(path: str) -> MLM:
  """Loads a workdir written by `mlm-flax train` (params only, from its latest checkpoint)."""
  from mlm_flax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{path} is not an mlm_flax workdir (no config.json); '
                            'pass the --workdir of a `mlm-flax train` run.')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = make_model(config.model)
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids + 1)['params'])
  ckpt = checkpoint.Checkpointer(path, create=False, async_save=False)
  params, meta = ckpt.restore_params(abstract)
  ckpt.close()
  tok = tokenizer_lib.load_tokenizer(os.path.join(path, 'tokenizer'))
  return MLM(config=config, params=params, tokenizer=tok, model=model, step=int(meta['step']))


@functools.partial(jax.jit, static_argnames=('model', 'top_k'))
def _top_k_at_all_positions(params, model, ids, segment_ids, top_k: int):
  logits = model.apply({'params': params}, ids, segment_ids).astype(jnp.float32)
  return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)


def _bucket(length: int, limit: int) -> int:
  return min(next((b for b in _BUCKETS if b >= length), length), limit)


def fill_mask(mlm: MLM, texts: str | Sequence[str], top_k: int = 5) -> list:
  """Top-k completions of each mask token, shaped like the transformers fill-mask pipeline.

  One text with one mask → a list of {"score", "token", "token_str", "sequence"};
  several masks → one such list per mask; several texts → one result per text.
  Scores are softmax probabilities over the whole vocabulary.
  """
  tok = mlm.tokenizer
  if tok.mask_token_id is None:
    raise ValueError('the tokenizer has no mask token; fill-mask needs one.')
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  encoded = [tok(t)['input_ids'] for t in texts]
  limit = mlm.config.model.max_position_embeddings
  for text, ids in zip(texts, encoded):
    if tok.mask_token_id not in ids:
      raise ValueError(f'no mask token {tok.mask_token!r} in {text!r}; put {tok.mask_token} where '
                       'the word to predict goes.')
    if len(ids) > limit:
      raise ValueError(f'{text[:40]!r}... is {len(ids)} tokens, more than the model\'s {limit} positions; '
                       'shorten it around the mask.')
  length = _bucket(max(map(len, encoded)), limit)
  ids = np.full((len(texts), length), tok.pad_token_id, np.int32)
  segments = np.zeros((len(texts), length), np.int32)
  for i, row in enumerate(encoded):
    ids[i, :len(row)], segments[i, :len(row)] = row, 1
  scores, tokens = jax.device_get(
      _top_k_at_all_positions(mlm.params, mlm.model, ids, segments, min(top_k, mlm.config.model.vocab_size)))

  results = []
  for i, row in enumerate(encoded):
    positions = [p for p, t in enumerate(row) if t == tok.mask_token_id]
    per_mask = []
    for p in positions:
      preds = []
      for score, token in zip(scores[i, p].tolist(), tokens[i, p].tolist()):
        filled = list(row)
        filled[p] = token
        preds.append({'score': score, 'token': token, 'token_str': tok.decode([token]),
                      'sequence': tok.decode(filled, skip_special_tokens=len(positions) == 1)})
      per_mask.append(preds)
    results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
  return results[0] if single or len(results) == 1 else results


def held_out_examples(texts: Sequence[str], tok, n: int) -> list[str]:
  """Up to `n` short sentences from held-out texts with one whole word masked (for a quick look)."""
  examples = []
  for text in texts:
    sentence = re.split(r'(?<=[.!?])\s', text.strip())[0]
    words = sentence.split()
    if not 6 <= len(words) <= 20:
      continue
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3
                  and len(tok.tokenize(w)) == 1 and 0 < i < len(words) - 1]
    if candidates:
      i = candidates[len(candidates) // 2]
      examples.append(' '.join(words[:i] + [tok.mask_token] + words[i + 1:]))
    if len(examples) == n:
      break
  return examples
