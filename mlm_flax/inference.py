"""Inference: `load(...)` a trained model and `fill_mask(...)` like `transformers.pipeline("fill-mask")`;
`load_classifier(...)` a task model and `classify(...)` like pipeline("text-classification") or
pipeline("token-classification") (question answering: `mlm_flax.answer`)."""

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm_flax import checkpoint, workdir_json
from mlm_flax.interop.hf import is_hf_folder, looks_like_hub_name  # pylint: disable=unused-import  # re-exported
from mlm_flax.models import abstract_params, position_offset  # pylint: disable=unused-import  # re-exported
from mlm_flax.objectives import objective_module, objective_type

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
  path = os.fspath(path)
  dtype = _compute_dtype(dtype)
  if is_hf_folder(path) or (not os.path.exists(path) and looks_like_hub_name(path)):
    from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
    config, params, tok, model = hf.load_hf(path, dtype)
    return MLM(config=config, params=params, tokenizer=tok, model=model)
  config, params, tok, step = load_run(path, dtype)
  model_cfg, model, params = objective_module(config).mlm_of(config, params)  # ELECTRA: the generator
  if objective_type(config) != 'mlm':
    config.model = ml_collections.ConfigDict(model_cfg)
  return MLM(config=config, params=params, tokenizer=tok, model=model, step=step)


def load_run(path: str, dtype: str = 'float32') -> tuple[ml_collections.ConfigDict, Any, Any, int]:
  """A pretraining workdir's (config, params of its objective, tokenizer, step): the latest good checkpoint, or
  the weights `mlm-flax import` put there. For MLM the params are the model's; for ELECTRA the generator's and
  the discriminator's (`objectives.electra`)."""
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  saved = workdir_json.read_config(path)
  if saved is None:
    raise FileNotFoundError(f'{path} is not an mlm_flax workdir (no config.json) nor a Hugging Face model '
                            'folder; pass the --workdir of a `mlm-flax train` run.')
  config = ml_collections.ConfigDict(saved)
  config.model.dtype = dtype
  target = objective_module(config).abstract_params(config)
  ckpt = checkpoint.Checkpointer(path, create=False, async_save=False)
  try:
    if ckpt.latest_step() is None and ckpt.has_imported():
      params, step = ckpt.restore_imported(target), 0
    else:
      params, meta = ckpt.restore_params(target)
      step = int(meta['step'])
  finally:
    ckpt.close()
  return config, params, tokenizer_lib.load_tokenizer(os.path.join(path, 'tokenizer')), step


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
  encoded = _encode_masked(tok, texts, single, max_length(mlm))
  if not texts:
    return []
  candidates = target_ids(tok, targets) if targets else None
  k = min(top_k, mlm.config.model.vocab_size if candidates is None else len(candidates))
  mask_positions = [[p for p, t in enumerate(row) if t == tok.mask_token_id] for row in encoded]
  scores, tokens = _top_k_batched(mlm, encoded, mask_positions, k, candidates, batch_size)
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


def _encode_masked(tok, texts: list, single: bool, limit: int) -> list[list[int]]:
  """Each text's token ids; ValueError naming the first text that is not a string, has no mask or is too long."""
  where = lambda i: 'the text' if single else f'text {i}'
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f'{where(i)} is a {type(text).__name__}, not a string.')
  encoded = [tok(t)['input_ids'] for t in texts]
  for i, (text, ids) in enumerate(zip(texts, encoded)):
    if tok.mask_token_id not in ids:
      raise ValueError(f'no mask token {tok.mask_token!r} in {where(i)} {_clip(text)}; put {tok.mask_token} '
                       'where the word to predict goes.')
    if len(ids) > limit:
      raise ValueError(f'{where(i)} {_clip(text)} is {len(ids)} tokens, more than the model\'s {limit} '
                       'positions; shorten it around the mask.')
  return encoded


def _top_k_batched(mlm: MLM, encoded: list[list[int]], mask_positions: list[list[int]], k: int,
                   candidates: np.ndarray | None, batch_size: int) -> tuple[list, list]:
  """(scores, token ids) [masks, k] per text, computed in chunks of bucketed shapes (few compiles), similar
  lengths sharing a batch."""
  tok, limit = mlm.tokenizer, max_length(mlm)
  scores, tokens = [None] * len(encoded), [None] * len(encoded)
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
  for start in range(0, len(encoded), batch_size):
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
  return scores, tokens


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


# Classification: `load_classifier(...)` a task model and `classify(...)` like pipeline("text-classification") /
# pipeline("token-classification").

@dataclasses.dataclass
class Classifier:
  """Everything classify and export need: the run config (`config.model`), params `{'encoder', 'head'}`, the
  tokenizer, the `TaskModel`, its task, label names (id order), Hugging Face `problem_type` (None: from the
  number of labels), head options and the checkpoint step."""
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  model: Any
  task: str
  labels: list[str]
  problem_type: str | None = None
  classifier_dropout: float = 0.0
  classifier_pooling: str = 'cls'
  step: int = 0


def is_task_model(path: str | os.PathLike) -> bool:
  """Whether `path` (`DIR` or `DIR:STEP`) holds a task model: a fine-tuned workdir (its config.json has a `task`)
  or a Hugging Face `*For{Sequence,Token}Classification` / `*ForQuestionAnswering` folder."""
  from mlm_flax.tasks import model as task_lib  # pylint: disable=g-import-not-at-top
  config = workdir_json.read_config(task_lib.split_step(os.fspath(path))[0])
  if config is None:
    return False
  if 'model_type' in config:
    from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
    return hf.task_info(config)['task'] is not None
  return 'task' in config


def load_classifier(path: str | os.PathLike, dtype: str | None = None) -> Classifier:
  """Loads a task model: a workdir written by `mlm-flax finetune` (`DIR` or `DIR:STEP`), or a Hugging Face
  `*ForSequenceClassification` / `*ForTokenClassification` folder (or hub name). Float32 unless `dtype` asks
  otherwise (see `load`)."""
  from mlm_flax.tasks import model as task_lib  # pylint: disable=g-import-not-at-top
  enc = task_lib.load_encoder(os.fspath(path), _compute_dtype(dtype))
  if enc.task is None:
    raise ValueError(f'{os.fspath(path)} has no classification head (a masked LM or an encoder); fine-tune it first '
                     '(`mlm-flax finetune --init MODEL`) or pass a fine-tuned workdir or *ForSequenceClassification '
                     'folder.')
  model = task_lib.make_task_model(enc.model, enc.task, len(enc.labels), enc.classifier_dropout,
                                   enc.classifier_pooling)
  params = {'encoder': enc.params, 'head': enc.head}
  expected = task_lib.abstract_task_params(model)
  shapes = lambda t: jax.tree.map(np.shape, t)
  if shapes(jax.tree.map(np.asarray, params)) != shapes(expected):
    raise ValueError(f'{os.fspath(path)}: its task head does not match its config (labels: {len(enc.labels)}, '
                     f'head params: {sorted(enc.head)}); re-export or re-train it.')
  config = enc.config if enc.config is not None else ml_collections.ConfigDict({'model': enc.model})
  return Classifier(config=config, params=jax.tree.map(jnp.asarray, params), tokenizer=enc.tokenizer, model=model,
                    task=enc.task, labels=list(enc.labels), problem_type=enc.problem_type,
                    classifier_dropout=enc.classifier_dropout, classifier_pooling=enc.classifier_pooling,
                    step=enc.step)


@functools.partial(jax.jit, static_argnames=('model',))
def _task_logits(params, model, ids, segment_ids, token_type_ids):
  return model.apply({'params': params}, ids, segment_ids, token_type_ids).astype(jnp.float32)


def _batched_logits(clf: Classifier, encoded: list[dict], batch_size: int) -> list[np.ndarray]:
  """Logits per encoded input ([labels], or [length, labels] for token tasks), in bucketed padded batches."""
  tok, limit = clf.tokenizer, max_length(clf)
  per_token = clf.task in ('token_classification', 'question_answering')
  out = [None] * len(encoded)
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]['input_ids']))
  for start in range(0, len(encoded), batch_size):
    chunk = order[start:start + batch_size]
    length = _bucket(max(len(encoded[i]['input_ids']) for i in chunk), limit)
    rows = _bucket(len(chunk), batch_size)
    ids = np.full((rows, length), tok.pad_token_id, np.int32)
    segments, types = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for r, i in enumerate(chunk):
      n = len(encoded[i]['input_ids'])
      ids[r, :n], segments[r, :n] = encoded[i]['input_ids'], 1
      types[r, :n] = encoded[i].get('token_type_ids') or [0] * n
    logits = np.asarray(jax.device_get(_task_logits(clf.params, clf.model, ids, segments, types)))
    for r, i in enumerate(chunk):
      out[i] = logits[r, :len(encoded[i]['input_ids'])] if per_token else logits[r]
  return out


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


FUNCTIONS = ('softmax', 'sigmoid', 'none')
_LEGACY = ''  # `top_k` not given: the pipeline's legacy output (the top label only)


def _scores(clf: Classifier, logits: np.ndarray, function_to_apply: str | None) -> np.ndarray:
  """The pipeline's scores: by default none for regression, sigmoid for multi-label or one label, else softmax."""
  if function_to_apply is None:
    if clf.problem_type == 'regression':
      function_to_apply = 'none'
    elif clf.problem_type == 'multi_label_classification' or len(clf.labels) == 1:
      function_to_apply = 'sigmoid'
    else:
      function_to_apply = 'softmax'
  function_to_apply = function_to_apply.lower()
  if function_to_apply not in FUNCTIONS:
    raise ValueError(f'function_to_apply={function_to_apply!r}; use one of {", ".join(FUNCTIONS)}.')
  if function_to_apply == 'sigmoid':
    return 1.0 / (1.0 + np.exp(-logits))
  return _softmax(logits) if function_to_apply == 'softmax' else logits


def classify(clf: Classifier, inputs: Any, top_k: int | None | str = _LEGACY, function_to_apply: str | None = None,
             batch_size: int = 64) -> Any:
  """Labels of each input, shaped exactly like `transformers.pipeline("text-classification")` (sequence tasks)
  or `pipeline("token-classification")` with aggregation_strategy none (token tasks).

  Sequence tasks: an input is a text or a pair `{"text", "text_pair"}`. Without `top_k`, each gives its best
  `{"label", "score"}` (one text: a list of one; a pair: the dict); with `top_k` (None: all), a list of that many
  sorted by score. Scores follow `function_to_apply` (default: as the pipeline, see `_scores`). Token tasks: per
  text, a list of `{"entity", "score", "index", "word", "start", "end"}` for every non-special token whose
  label is not "O" (softmax scores). Several inputs give a list, one result each.

  Bad input raises ValueError before any compute, naming the index of the first bad input.
  """
  tok = clf.tokenizer
  if clf.task == 'question_answering':
    raise ValueError('this is a question-answering model; use `mlm-flax answer --question Q --context C` '
                     '(`mlm_flax.answer.answer`), not classify.')
  single = isinstance(inputs, (str, dict))
  items = [inputs] if single else list(inputs)
  where = lambda i: 'the input' if single else f'input {i}'
  if top_k != _LEGACY and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f'top_k={top_k!r}; ask for at least 1 label (or None: all).')
  encoded, limit = [], max_length(clf)
  for i, item in enumerate(items):
    if isinstance(item, dict) and clf.task != 'token_classification':
      if set(item) - {'text', 'text_pair'} or not isinstance(item.get('text'), str):
        raise ValueError(f'{where(i)} is a dict with keys {sorted(item)}; a text pair is {{"text": ..., '
                         '"text_pair": ...}.')
      enc = tok(text=item['text'], text_pair=item.get('text_pair'))
    elif isinstance(item, str):
      enc = tok(item, return_offsets_mapping=clf.task == 'token_classification' and tok.is_fast,
                return_special_tokens_mask=True)
    else:
      kind = 'text' if clf.task == 'token_classification' else 'text or {"text", "text_pair"} dict'
      raise ValueError(f'{where(i)} is a {type(item).__name__}, not a {kind}.')
    if len(enc['input_ids']) > limit:
      raise ValueError(f'{where(i)} is {len(enc["input_ids"])} tokens, more than the model\'s {limit} positions; '
                       'shorten it.')
    encoded.append(enc)
  if not items:
    return []
  logits = _batched_logits(clf, encoded, batch_size)
  if clf.task == 'token_classification':
    results = [_entities(clf, item, enc, l) for item, enc, l in zip(items, encoded, logits)]
    return results[0] if single else results
  results = []
  for item, l in zip(items, logits):
    scores = _scores(clf, l, function_to_apply)
    if top_k == _LEGACY:
      best = int(scores.argmax())
      result = {'label': clf.labels[best], 'score': float(scores[best])}
      results.append([result] if isinstance(item, str) and single else result)
    else:
      ranked = sorted(({'label': clf.labels[j], 'score': float(s)} for j, s in enumerate(scores)),
                      key=lambda r: r['score'], reverse=True)
      results.append(ranked if top_k is None else ranked[:top_k])
  return results[0] if single else results


def _entities(clf: Classifier, text: str, enc: Any, logits: np.ndarray, ignore_labels=('O',)) -> list[dict]:
  """pipeline("token-classification")'s entities (aggregation none) of one text."""
  tok, scores = clf.tokenizer, _softmax(logits)
  offsets = enc.get('offset_mapping')
  out = []
  for idx, (token, special) in enumerate(zip(enc['input_ids'], enc['special_tokens_mask'])):
    if special:
      continue
    word = tok.convert_ids_to_tokens(int(token))
    start = end = None
    if offsets is not None:
      start, end = (int(x) for x in offsets[idx])
      if int(token) == tok.unk_token_id:
        word = text[start:end]
    best = int(scores[idx].argmax())
    if clf.labels[best] in ignore_labels:
      continue
    out.append({'entity': clf.labels[best], 'score': float(scores[idx, best]), 'index': idx, 'word': word,
                'start': start, 'end': end})
  return out
