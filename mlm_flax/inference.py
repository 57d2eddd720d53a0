"""Inference: `load(...)` a trained model and `fill_mask(...)` like `transformers.pipeline("fill-mask")`."""

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax import checkpoint
from mlm_flax.models import make_model, position_offset

DTYPES = ('float32', 'bfloat16', 'float16', 'auto')  # compute dtypes `load` accepts; float32 by default

# Padded shapes: steps of at most 1.5x, so padding wastes little compute and few lengths compile.
_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclasses.dataclass
class MLM:
  """Everything fill-mask needs: the resolved config, the params pytree, the tokenizer, the module."""
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  model: Any
  step: int = 0


def abstract_params(model) -> Any:
  """Shapes and dtypes of the model's params, without allocating them."""
  ids = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids + 1)['params'])


def is_hf_folder(path: str) -> bool:
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    return False
  with open(config_path) as f:
    return 'model_type' in json.load(f)


def looks_like_hub_name(path: str) -> bool:
  """'name' or 'org/name': what `load` tries on the Hugging Face hub when no such local path exists."""
  return not path.startswith(('/', '.', '~')) and path.count('/') <= 1


def _compute_dtype(dtype: str | None) -> str:
  """float32 unless asked: answers then match `transformers.pipeline("fill-mask")` on every machine, whereas
  the training default 'auto' is bf16 on GPU/TPU/AMX CPUs (a different top-1 is possible)."""
  dtype = 'float32' if dtype is None else dtype
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; use one of {", ".join(DTYPES)} (default float32, exact).')
  return dtype


def load(path: str | os.PathLike, dtype: str | None = None) -> MLM:
  """Loads a workdir written by `mlm-flax train`/`import` (params only, no optimizer state), or a
  Hugging Face BERT/RoBERTa folder (or hub name, where the network allows).

  Computes in float32 unless `dtype` asks for 'bfloat16', 'float16' or 'auto' (training's choice: bf16 on
  GPU/TPU/AMX CPUs), whatever the workdir trained with; `mlm.config.model.dtype` says which is used.
  """
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  dtype = _compute_dtype(dtype)
  if is_hf_folder(path) or (not os.path.exists(path) and looks_like_hub_name(path)):
    from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
    config, params, tok, model = hf.load_hf(path, dtype)
    return MLM(config=config, params=params, tokenizer=tok, model=model)
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{path} is not an mlm_flax workdir (no config.json) nor a Hugging Face model '
                            'folder; pass the --workdir of a `mlm-flax train` run.')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model.dtype = dtype
  model = make_model(config.model)
  ckpt = checkpoint.Checkpointer(path, create=False, async_save=False)
  try:
    if ckpt.latest_step() is None and ckpt.has_imported():
      params, step = ckpt.restore_imported(abstract_params(model)), 0
    else:
      params, meta = ckpt.restore_params(abstract_params(model))
      step = int(meta['step'])
  finally:
    ckpt.close()
  tok = tokenizer_lib.load_tokenizer(os.path.join(path, 'tokenizer'))
  return MLM(config=config, params=params, tokenizer=tok, model=model, step=step)


def max_length(mlm: MLM) -> int:
  """Longest input the position embeddings allow (RoBERTa numbers positions after the pad id)."""
  return mlm.config.model.max_position_embeddings - position_offset(mlm.config.model)


@functools.partial(jax.jit, static_argnames=('model', 'top_k'))
def _top_k_at(params, model, ids, segment_ids, positions, top_k: int, target_ids=None):
  """Top-k (probability, index) at `positions` [batch, M]; over `target_ids` only when given."""
  logits = model.apply({'params': params}, ids, segment_ids, masked_positions=positions)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if target_ids is None:
    return jax.lax.top_k(probs, top_k)
  scores, index = jax.lax.top_k(probs[..., target_ids], top_k)
  return scores, target_ids[index]


def target_ids(tok, targets: Sequence[str]) -> np.ndarray:
  """Vocabulary ids of `targets`; a word not in the vocabulary becomes its first sub-token, with a
  warning (as in transformers' fill-mask)."""
  vocab, ids = tok.get_vocab(), []
  for target in targets:
    i = vocab.get(target)
    if i is None:
      pieces = tok(target, add_special_tokens=False)['input_ids']
      if not pieces:
        logging.warning('target %r does not exist in the vocabulary and has no sub-token; ignored.', target)
        continue
      i = pieces[0]
      logging.warning('target %r does not exist in the vocabulary; replaced with %r.', target,
                      tok.convert_ids_to_tokens(i))
    ids.append(i)
  if not ids:
    raise ValueError(f'none of the targets {list(targets)} maps to a vocabulary token; give other targets.')
  return np.asarray(sorted(set(ids)), np.int32)


def _bucket(length: int, limit: int) -> int:
  return min(next((b for b in _BUCKETS if b >= length), length), limit)


def _clip(text: str, n: int = 60) -> str:
  return repr(text) if len(text) <= n else repr(text[:n]) + f'... ({len(text)} characters)'


def fill_mask(mlm: MLM, texts: str | Sequence[str], top_k: int = 5,
              targets: Sequence[str] | None = None, batch_size: int = 64) -> list:
  """Top-k completions of each mask token, shaped like the transformers fill-mask pipeline.

  One text with one mask → a list of {"score", "token", "token_str", "sequence"};
  several masks → one such list per mask; several texts → one result per text.
  Scores are softmax probabilities over the whole vocabulary; `targets` restricts the
  candidates to those words. Texts are padded to a few bucket lengths, so new lengths
  rarely recompile.

  Bad input raises ValueError before any compute: a text without a mask token, one longer than
  the model's positions, a non-string, `top_k < 1`. In a batch, the message names the index of
  the first bad text (`text 3 ...`) and nothing is returned for the others; an empty list gives [].
  """
  tok = mlm.tokenizer
  if tok.mask_token_id is None:
    raise ValueError('the tokenizer has no mask token; fill-mask needs one.')
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f'top_k={top_k!r}; ask for at least 1 prediction per mask.')
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  where = lambda i: 'the text' if single else f'text {i}'
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f'{where(i)} is a {type(text).__name__}, not a string.')
  encoded = [tok(t)['input_ids'] for t in texts]
  limit = max_length(mlm)
  for i, (text, ids) in enumerate(zip(texts, encoded)):
    if tok.mask_token_id not in ids:
      raise ValueError(f'no mask token {tok.mask_token!r} in {where(i)} {_clip(text)}; put {tok.mask_token} '
                       'where the word to predict goes.')
    if len(ids) > limit:
      raise ValueError(f'{where(i)} {_clip(text)} is {len(ids)} tokens, more than the model\'s {limit} '
                       'positions; shorten it around the mask.')
  if not texts:
    return []
  candidates = target_ids(tok, targets) if targets else None
  k = min(top_k, mlm.config.model.vocab_size if candidates is None else len(candidates))
  mask_positions = [[p for p, t in enumerate(row) if t == tok.mask_token_id] for row in encoded]
  scores, tokens = [None] * len(texts), [None] * len(texts)
  order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
  for start in range(0, len(texts), batch_size):  # chunks of bucketed shapes: few compiles
    chunk = order[start:start + batch_size]
    length = _bucket(max(len(encoded[i]) for i in chunk), limit)
    num_masks = _bucket(max(len(mask_positions[i]) for i in chunk), length)
    rows = _bucket(len(chunk), batch_size)
    ids = np.full((rows, length), tok.pad_token_id, np.int32)
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, num_masks), np.int32)
    for r, i in enumerate(chunk):
      ids[r, :len(encoded[i])], segments[r, :len(encoded[i])] = encoded[i], 1
      positions[r, :len(mask_positions[i])] = mask_positions[i]
    s, t = jax.device_get(_top_k_at(mlm.params, mlm.model, ids, segments, positions, k, candidates))
    for r, i in enumerate(chunk):
      scores[i], tokens[i] = s[r], t[r]

  results = []
  for i, row in enumerate(encoded):
    positions = mask_positions[i]
    per_mask = []
    for j, p in enumerate(positions):
      preds = []
      for score, token in zip(scores[i][j].tolist(), tokens[i][j].tolist()):
        filled = list(row)
        filled[p] = token
        preds.append({'score': score, 'token': token, 'token_str': tok.decode([token]),
                      'sequence': tok.decode(filled, skip_special_tokens=len(positions) == 1)})
      per_mask.append(preds)
    results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
  return results[0] if single or len(results) == 1 else results


def held_out_examples(texts: Sequence[str], tok, n: int) -> list[tuple[str, str]]:
  """Up to `n` (sentence with one whole word masked, that word) from held-out texts, for a quick look."""
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
      examples.append((' '.join(words[:i] + [tok.mask_token] + words[i + 1:]), words[i]))
    if len(examples) == n:
      break
  return examples
