"""Extractive question answering (SQuAD format), as transformers' `examples/pytorch/question-answering/run_qa.py`.

Data: columns `question`, `context` and `answers` = {`text`: [...], `answer_start`: [...]} (SQuAD v2: empty lists
for an unanswerable question). A context longer than a window is cut into windows of `max_seq_length` tokens
that overlap by `doc_stride` tokens (the tokenizer's `truncation='only_second'`, `return_overflowing_tokens`),
question first. Each window is a row: `labels` [2] = the start and end token of the first answer, or the [CLS]
index when the answer is not wholly inside the window (or there is none). Evaluation scores questions, not
windows: `postprocess` picks each question's best span over its windows (n-best starts x ends, at most
`max_answer_length` tokens, in the context; v2: the null answer when its score beats the best span's by
`null_score_diff_threshold`), and `squad_metrics` scores the texts as SQuAD's official script (exact match and
F1 after normalisation, the max over gold answers, 0-100; v2 also over HasAns_ / NoAns_ questions).
"""

import collections
import dataclasses
import re
import string
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from mlm_flax.tasks import data as task_data

LABEL_NAMES = ['LABEL_0', 'LABEL_1']  # the head's two outputs (start, end), named as a HF *ForQuestionAnswering's
_TOKENIZE_CHUNK = 1000  # examples per tokenizer call


@dataclasses.dataclass
class Windows:
  """A split's windows: `rows` (`input_ids`, `segment_ids`, `token_type_ids`, `labels` [n, 2]) for the device,
  and for scoring on the host each window's `example` index and `offsets` [n, len, 2] (character offsets of
  context tokens, -1 on the question, special tokens and padding)."""
  rows: dict[str, np.ndarray]
  example: np.ndarray
  offsets: np.ndarray


def default_doc_stride(max_seq_length: int) -> int:
  """`task.doc_stride` when unset: 128 (run_qa's, with 384-token windows), at most a quarter of the window."""
  return min(128, max_seq_length // 4)


def columns(data_cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """{'question', 'context', 'answers'}: the data's column names (`data.*_column`)."""
  return {'question': data_cfg.question_column, 'context': data_cfg.context_column,
          'answers': data_cfg.answers_column}


def check_split(ds: Any, cols: dict[str, str], split: str) -> list[dict]:
  """The split's answers, refusing (ValueError naming the fix) missing columns, texts that are not strings
  and answers whose `answer_start` does not locate their `text` in the context."""
  for key, column in cols.items():
    if column not in ds.column_names:
      raise ValueError(f'The {split} split has no column {column!r} (data.{key}_column); its columns are '
                       f'{", ".join(ds.column_names)}. Question answering needs SQuAD-format data: question, '
                       'context, answers = {"text": [...], "answer_start": [...]}; set data.question_column, '
                       'data.context_column, data.answers_column.')
  questions, contexts, answers = ds[cols['question']], ds[cols['context']], ds[cols['answers']]
  for i, (q, c, a) in enumerate(zip(questions, contexts, answers)):
    if not isinstance(q, str) or not isinstance(c, str) or not q.strip() or not c:
      raise ValueError(f'The {split} split row {i} has an empty or missing question or context; fill or drop it.')
    if (not isinstance(a, dict) or not {'text', 'answer_start'} <= set(a) or not isinstance(a['text'], list)
        or not isinstance(a['answer_start'], list) or len(a['text']) != len(a['answer_start'])):
      raise ValueError(f'The {split} split row {i}: {cols["answers"]!r} is {a!r}; it must be {{"text": [...], '
                       '"answer_start": [...]} with one start per text (empty lists: no answer, SQuAD v2).')
    for text, start in zip(a['text'], a['answer_start']):
      if c[start:start + len(text)] != text:
        raise ValueError(f'The {split} split row {i}: answer {text!r} is not at answer_start={start} of its context '
                         f'(found {c[start:start + len(text)]!r}); answer_start must be the character offset of '
                         'the answer text in the context (fix the offsets, e.g. context.find(text)).')
  return answers


def check_doc_stride(tokenizer: Any, questions: Sequence[str], max_seq_length: int, doc_stride: int,
                     split: str) -> None:
  """Refuses a `doc_stride` that leaves a window no new context token: it must be below what remains of
  `max_seq_length` after the longest question and the special tokens."""
  lengths = [len(ids) for ids in tokenizer([q.lstrip() for q in questions], add_special_tokens=False)['input_ids']]
  longest = int(np.argmax(lengths))
  room = max_seq_length - lengths[longest] - tokenizer.num_special_tokens_to_add(pair=True)
  if doc_stride >= room:
    raise ValueError(f'task.doc_stride={doc_stride} does not fit max_seq_length={max_seq_length}: the longest '
                     f'{split} question (row {longest}, {lengths[longest]} tokens) leaves {room} context tokens per '
                     f'window; set --config.task.doc_stride below {max(room, 1)} or raise --config.max_seq_length.')


def tokenize_windows(tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], max_seq_length: int,
                     doc_stride: int) -> Any:
  """run_qa's tokenizer call (question first, questions left-stripped, padded to `max_seq_length`)."""
  return tokenizer([q.lstrip() for q in questions], list(contexts), truncation='only_second',
                   max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
                   return_offsets_mapping=True, padding='max_length')


def span_labels(input_ids: list[int], offsets: list[tuple[int, int]], sequence_ids: list[int | None],
                answer: dict, cls_id: int | None) -> tuple[int, int]:
  """run_qa's `prepare_train_features` for one window: the (start, end) tokens of the first answer, or the CLS
  index for none or an answer not wholly inside the window (its loops kept as they are)."""
  cls_index = input_ids.index(cls_id) if cls_id in input_ids else 0
  if not answer['answer_start']:
    return cls_index, cls_index
  start_char = answer['answer_start'][0]
  end_char = start_char + len(answer['text'][0])
  start = 0
  while sequence_ids[start] != 1:
    start += 1
  end = len(input_ids) - 1
  while sequence_ids[end] != 1:
    end -= 1
  if not (offsets[start][0] <= start_char and offsets[end][1] >= end_char):
    return cls_index, cls_index
  while start < len(offsets) and offsets[start][0] <= start_char:
    start += 1
  while offsets[end][1] >= end_char:
    end -= 1
  return start - 1, end + 1


def context_offsets(offsets: list[tuple[int, int]], sequence_ids: list[int | None]) -> np.ndarray:
  """run_qa's `prepare_validation_features` offsets: a context token's (start, end) characters, -1 elsewhere."""
  out = np.asarray(offsets, np.int32).reshape(-1, 2)
  out[np.asarray([s != 1 for s in sequence_ids])] = -1
  return out


def make_windows(tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], answers: Sequence[dict],
                 max_seq_length: int, doc_stride: int, chunk: int = _TOKENIZE_CHUNK, offsets: bool = True) -> Windows:
  """The windows of a split's examples with their labels, example indices and (`offsets`; training needs none)
  context offsets, tokenized `chunk` examples at a time."""
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError('task.type=question_answering needs a fast (Rust) tokenizer for offsets; the init model\'s '
                     'tokenizer is not one: save it with a tokenizer.json.')
  if tokenizer.padding_side != 'right':
    raise ValueError('task.type=question_answering puts the question first and pads on the right; the tokenizer '
                     "pads on the left: save it with padding_side='right'.")
  rows = collections.defaultdict(list)
  examples, context = [], []
  for first in range(0, len(questions), chunk):
    part = slice(first, first + chunk)
    enc = tokenize_windows(tokenizer, questions[part], contexts[part], max_seq_length, doc_stride)
    for i, ids in enumerate(enc['input_ids']):
      example = first + enc['overflow_to_sample_mapping'][i]
      seq = enc.sequence_ids(i)
      rows['input_ids'].append(ids)
      rows['segment_ids'].append(enc['attention_mask'][i])
      rows['token_type_ids'].append(enc['token_type_ids'][i] if 'token_type_ids' in enc else [0] * len(ids))
      rows['labels'].append(span_labels(ids, enc['offset_mapping'][i], seq, answers[example],
                                        tokenizer.cls_token_id))
      examples.append(example)
      if offsets:
        context.append(context_offsets(enc['offset_mapping'][i], seq))
  return Windows(rows={k: np.asarray(v, np.int32) for k, v in rows.items()}, example=np.asarray(examples, np.int32),
                 offsets=np.stack(context) if context else np.zeros((0, max_seq_length, 2), np.int32))


def _window_candidates(start: np.ndarray, end: np.ndarray, offsets: np.ndarray, n_best_size: int,
                       max_answer_length: int) -> list[tuple[float, int, int, float, float]]:
  """run_qa's candidate spans of one window: (score, start char, end char, start logit, end logit)."""
  out = []
  for s in np.argsort(start)[-1:-n_best_size - 1:-1].tolist():
    for e in np.argsort(end)[-1:-n_best_size - 1:-1].tolist():
      if offsets[s, 0] < 0 or offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
        continue
      out.append((start[s] + end[e], int(offsets[s, 0]), int(offsets[e, 1]), start[s], end[e]))
  return out


def predict_example(context: str, logits: np.ndarray, offsets: np.ndarray, n_best_size: int = 20,
                    max_answer_length: int = 30, version_2_with_negative: bool = False,
                    null_score_diff_threshold: float = 0.0) -> str:
  """run_qa's `postprocess_qa_predictions` for one question: `logits` [windows, len, 2] and `offsets`
  [windows, len, 2] of its windows in order; the predicted answer text ('' for no answer, v2)."""
  null = None  # the windows' smallest CLS score (start + end logit at index 0)
  prelim = []
  for w in range(len(logits)):
    start, end = logits[w, :, 0], logits[w, :, 1]
    if null is None or null[0] > start[0] + end[0]:
      null = (start[0] + end[0], 0, 0, start[0], end[0])
    prelim += _window_candidates(start, end, offsets[w], n_best_size, max_answer_length)
  if version_2_with_negative:
    prelim.append(null)
  preds = sorted(prelim, key=lambda p: p[0], reverse=True)[:n_best_size]
  if version_2_with_negative and not any(p[1:3] == (0, 0) for p in preds):
    preds.append(null)
  texts = [(context[p[1]:p[2]], p) for p in preds]
  if not texts or (len(texts) == 1 and texts[0][0] == ''):
    texts.insert(0, ('empty', (0.0, 0, 0, 0.0, 0.0)))
  if not version_2_with_negative:
    return texts[0][0]
  best = next((t for t in texts if t[0] != ''), ('', (0.0, 0, 0, 0.0, 0.0)))
  return '' if null[0] - best[1][3] - best[1][4] > null_score_diff_threshold else best[0]


def postprocess(contexts: Sequence[str], logits: np.ndarray, windows: Windows, **options) -> list[str]:
  """Each example's predicted text from its windows' start/end `logits` [n, len, 2] (`predict_example`)."""
  by_example = collections.defaultdict(list)
  for w, e in enumerate(windows.example.tolist()):
    by_example[e].append(w)
  return [predict_example(c, logits[by_example[i]], windows.offsets[by_example[i]], **options) if by_example[i]
          else '' for i, c in enumerate(contexts)]


# SQuAD's official evaluation (v1.1 and v2.0 scripts): normalisation, exact match and token F1.

def normalize_answer(s: str) -> str:
  """Lower case, without punctuation, articles (a, an, the) and extra whitespace."""
  s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', s, flags=re.UNICODE).split())


def exact(gold: str, pred: str) -> int:
  return int(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
  """Token F1 of the normalised answers; 1 or 0 when either is empty (agreement on no answer)."""
  gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
  if not gold_toks or not pred_toks:
    return float(gold_toks == pred_toks)
  same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_toks), same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def squad_metrics(golds: Sequence[Sequence[str]], preds: Sequence[str], version_2: bool = False) -> dict[str, float]:
  """`exact_match` and `f1` (0-100) over questions, each the max over its gold answers (none: only '' is right);
  `version_2` adds them over answerable (`HasAns_*`) and unanswerable (`NoAns_*`) questions, with counts."""
  scores = []
  for answers, pred in zip(golds, preds):
    gold = [a for a in answers if normalize_answer(a)] or ['']
    scores.append((max(exact(a, pred) for a in gold), max(f1(a, pred) for a in gold), gold != ['']))
  pct = lambda xs: 100.0 * float(np.mean(xs)) if xs else 0.0
  out = {'exact_match': pct([s[0] for s in scores]), 'f1': pct([s[1] for s in scores])}
  if version_2:
    for name, has in (('HasAns', True), ('NoAns', False)):
      part = [s for s in scores if s[2] == has]
      out.update({f'{name}_exact': pct([s[0] for s in part]), f'{name}_f1': pct([s[1] for s in part]),
                  f'{name}_total': len(part)})
  return out


def make_scorer(contexts: Sequence[str], answers: Sequence[dict], windows: Windows,
                task_cfg: ml_collections.ConfigDict, version_2: bool) -> Callable[[np.ndarray], dict]:
  """finetune's evaluation of a split: start/end logits of every window [n, len, 2] -> SQuAD metrics over its
  questions (and `num_examples`: the number of questions)."""
  golds = [a['text'] for a in answers]

  def score(logits: np.ndarray) -> dict[str, float]:
    preds = postprocess(contexts, logits, windows, n_best_size=task_cfg.n_best_size,
                        max_answer_length=task_cfg.max_answer_length, version_2_with_negative=version_2,
                        null_score_diff_threshold=task_cfg.null_score_diff_threshold)
    return {**squad_metrics(golds, preds, version_2), 'num_examples': len(contexts)}

  return score


def load_qa_data(data_cfg: ml_collections.ConfigDict, task_cfg: ml_collections.ConfigDict, tokenizer: Any,
                 max_seq_length: int) -> task_data.TaskData:
  """Loads, checks and cuts into windows the splits of a question-answering run; `TaskData.scorers` score
  validation / test at the question level. v2 (`task.version_2_with_negative` None): when any train or
  validation question has no answer."""
  raw = task_data.load_raw(data_cfg)
  cols = columns(data_cfg)
  answers, doc_stride = {}, task_cfg.doc_stride or default_doc_stride(max_seq_length)
  for split, ds in raw.items():
    if len(ds) == 0:
      raise ValueError(f'The {split} split is empty; add examples to it.')
    answers[split] = check_split(ds, cols, split)
    check_doc_stride(tokenizer, ds[cols['question']], max_seq_length, doc_stride, split)
  version_2 = task_cfg.version_2_with_negative
  if version_2 is None:
    version_2 = any(not a['text'] for s in ('train', 'validation') for a in answers[s])
  splits, scorers = {}, {}
  for split, ds in raw.items():
    contexts = ds[cols['context']]
    windows = make_windows(tokenizer, ds[cols['question']], contexts, answers[split], max_seq_length, doc_stride,
                           offsets=split != 'train')
    splits[split] = windows.rows
    if split != 'train':
      scorers[split] = make_scorer(contexts, answers[split], windows, task_cfg, version_2)
  return task_data.TaskData(splits=splits, label_names=list(LABEL_NAMES), columns=dict(cols), scorers=scorers)
