"""Extractive question answering with a loaded model, exactly as `transformers.pipeline("question-answering")`
(transformers <= 5.2, the last releases that ship it; `mlm-flax answer`).

`load_qa(MODEL)` loads a fine-tuned question-answering workdir or a Hugging Face `*ForQuestionAnswering` folder
(float32 unless asked: answers then equal the pipeline's on every machine); `answer(model, inputs)` answers.
The pipeline's algorithm, step by step: each (question, context) is cut into windows (`max_seq_len` tokens,
`doc_stride` overlap, question first, no padding); per window the start and end logits of tokens outside the
context (question, special tokens; [CLS] stays) are set to -10000 before a softmax each; [CLS]'s start * end
probability is the window's null score; [CLS] is then zeroed and `decode_spans` takes the top spans of the outer
product start x end (end >= start, at most `max_answer_len` tokens); a span's characters are those of its first
and last words (`align_to_words`), spans of equal text (case-insensitive) over windows add their scores, and
`handle_impossible_answer` adds the smallest null score as the answer ''.
"""

import os
from typing import Any, Sequence

import numpy as np

from mlm_flax import inference


def pre_top_k(top_k: int) -> int:
  """Candidates per window before equal answers merge (the pipeline's, with align_to_words)."""
  return top_k * 2 + 10


def load_qa(path: str | os.PathLike, dtype: str | None = None) -> inference.Classifier:
  """A question-answering task model (`inference.Classifier` with task 'question_answering')."""
  model = inference.load_classifier(path, dtype)
  if model.task != 'question_answering':
    raise ValueError(f'{os.fspath(path)} is a {model.task} model, not a question-answering one; fine-tune with '
                     '--config.task.type=question_answering or pass a *ForQuestionAnswering folder.')
  return model


def decode_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int,
                 undesired: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The pipeline's `decode_spans`: the `top_k` (start, end, score) of start x end probabilities [1, len],
  end >= start, at most `max_answer_len` tokens, both ends allowed by `undesired` ([1, len], 1: allowed)."""
  outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
  candidates = np.tril(np.triu(outer), max_answer_len - 1)
  flat = candidates.flatten()
  if top_k == 1:
    order = [np.argmax(flat)]
  elif len(flat) < top_k:
    order = np.argsort(-flat)
  else:
    idx = np.argpartition(-flat, top_k)[0:top_k]
    order = idx[np.argsort(-flat[idx])]
  starts, ends = np.unravel_index(order, candidates.shape)[1:]
  allowed = undesired.nonzero()  # (rows, columns): the pipeline tests membership in both, as it does
  keep = np.isin(starts, allowed) & np.isin(ends, allowed)
  starts, ends = starts[keep], ends[keep]
  return starts, ends, candidates[0, starts, ends]


def select_spans(start: np.ndarray, end: np.ndarray, p_mask: np.ndarray, top_k: int, max_answer_len: int,
                 min_null_score: float, handle_impossible_answer: bool) -> tuple[Any, Any, Any, float]:
  """The pipeline's `select_starts_ends` on one window's f32 logits [1, len] (unpadded)."""
  undesired = np.abs(np.asarray(p_mask) - 1)  # 1: may be in the answer (windows are unpadded: no attention mask)
  mask = undesired == 0.0
  start = np.where(mask, -10000.0, start)
  end = np.where(mask, -10000.0, end)
  start = np.exp(start - start.max(axis=-1, keepdims=True))
  start = start / start.sum()
  end = np.exp(end - end.max(axis=-1, keepdims=True))
  end = end / end.sum()
  if handle_impossible_answer:
    min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
  start[0, 0] = end[0, 0] = 0.0
  starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired)
  return starts, ends, scores, min_null_score


def _char_span(encoding: Any, s: int, e: int, sequence_index: int) -> tuple[int, int]:
  """The pipeline's `get_indices` with align_to_words: the first word's start and the last word's end."""
  try:
    return (encoding.word_to_chars(encoding.token_to_word(s), sequence_index=sequence_index)[0],
            encoding.word_to_chars(encoding.token_to_word(e), sequence_index=sequence_index)[1])
  except Exception:  # pylint: disable=broad-except  # tokenizers without words: offsets, as the pipeline
    return encoding.offsets[s][0], encoding.offsets[e][1]


def _windows(tok: Any, question: str, context: str, max_seq_len: int, doc_stride: int) -> tuple[Any, list]:
  """The pipeline's preprocess (fast tokenizer): the windows' encoding and p_mask (1: not in the answer)."""
  question_first = tok.padding_side == 'right'
  enc = tok(text=question if question_first else context, text_pair=context if question_first else question,
            padding='do_not_pad', truncation='only_second' if question_first else 'only_first',
            max_length=max_seq_len, stride=doc_stride, return_token_type_ids=True,
            return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
  p_masks = []
  for i, ids in enumerate(enc['input_ids']):
    p_mask = [int(t != 1) if question_first else 0 for t in enc.sequence_ids(i)]
    for j, token in enumerate(ids):
      if tok.cls_token_id is not None and token == tok.cls_token_id:
        p_mask[j] = 0
    p_masks.append(p_mask)
  return enc, p_masks


def _answers(tok: Any, context: str, enc: Any, p_masks: list, logits: list[np.ndarray], top_k: int,
             handle_impossible_answer: bool, max_answer_len: int) -> dict | list[dict]:
  """The pipeline's postprocess of one example: its windows' logits [len, 2] -> answers."""
  min_null, answers = 1000000.0, []
  sequence_index = 1 if tok.padding_side == 'right' else 0
  for w, window in enumerate(logits):
    starts, ends, scores, min_null = select_spans(
        window[None, :, 0], window[None, :, 1], np.asarray([p_masks[w]]), pre_top_k(top_k), max_answer_len,
        min_null, handle_impossible_answer)
    for s, e, score in zip(starts, ends, scores):
      first, last = _char_span(enc[w], int(s), int(e), sequence_index)
      text = context[first:last]
      same = next((a for a in answers if a['answer'].lower() == text.lower()), None)
      if same:
        same['score'] += score.item()
      else:
        answers.append({'score': score.item(), 'start': first, 'end': last, 'answer': text})
  if handle_impossible_answer:
    answers.append({'score': min_null, 'start': 0, 'end': 0, 'answer': ''})
  answers = sorted(answers, key=lambda a: a['score'], reverse=True)[:top_k]
  return answers[0] if len(answers) == 1 else answers


def _check_inputs(inputs: Any) -> list[dict]:
  items = [inputs] if isinstance(inputs, dict) else list(inputs)
  for i, item in enumerate(items):
    if not isinstance(item, dict) or not {'question', 'context'} <= set(item):
      raise ValueError(f'input {i} is {item!r}; give {{"question": ..., "context": ...}}.')
    for key in ('question', 'context'):
      if not isinstance(item[key], str) or not item[key]:
        raise ValueError(f'input {i}: `{key}` must be a non-empty string, not {item[key]!r}.')
  return items


def answer(model: inference.Classifier, inputs: dict | Sequence[dict], top_k: int = 1,
           handle_impossible_answer: bool = False, max_answer_len: int = 15, doc_stride: int | None = None,
           max_seq_len: int | None = None, batch_size: int = 64) -> dict | list:
  """Answers shaped exactly like `pipeline("question-answering")(inputs, ...)`, with its arguments and defaults.

  `inputs`: {"question", "context"} or a list of them. One input (or a list of one): a dict {"score", "start",
  "end", "answer"} (`start`/`end`: characters of the context), or a list of `top_k` such dicts; several inputs: a
  list with one such result each. `max_seq_len` (default min(384, the tokenizer's model_max_length, the
  model's positions)) and `doc_stride` (default min(max_seq_len // 2, 128)) cut long contexts into windows.
  Bad input raises ValueError before any compute.
  """
  items = _check_inputs(inputs)
  if top_k < 1 or max_answer_len < 1:
    raise ValueError(f'top_k={top_k} and max_answer_len={max_answer_len} must be at least 1.')
  tok = model.tokenizer
  if not getattr(tok, 'is_fast', False):
    raise ValueError('answer needs a fast (Rust) tokenizer for offsets; save the model with a tokenizer.json.')
  max_seq_len = max_seq_len or min(tok.model_max_length, 384, inference.max_length(model))
  doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
  if doc_stride > max_seq_len:
    raise ValueError(f'doc_stride={doc_stride} is larger than max_seq_len={max_seq_len}; lower it.')
  if max_seq_len > inference.max_length(model):
    raise ValueError(f'max_seq_len={max_seq_len} exceeds the model\'s {inference.max_length(model)} positions.')
  windows = [_windows(tok, it['question'], it['context'], max_seq_len, doc_stride) for it in items]
  types = 'token_type_ids' in tok.model_input_names  # the pipeline feeds only the model's inputs
  encoded = [{'input_ids': ids, 'token_type_ids': enc['token_type_ids'][w] if types else None}
             for enc, _ in windows for w, ids in enumerate(enc['input_ids'])]
  logits = inference._batched_logits(model, encoded, batch_size)  # pylint: disable=protected-access
  results, first = [], 0
  for it, (enc, p_masks) in zip(items, windows):
    n = len(enc['input_ids'])
    results.append(_answers(tok, it['context'], enc, p_masks, logits[first:first + n], top_k,
                            handle_impossible_answer, max_answer_len))
    first += n
  return results[0] if len(results) == 1 else results
