"""Task metrics from well-kept libraries: scikit-learn (accuracy, macro-F1, Matthews correlation), scipy (Pearson,
Spearman) and seqeval (entity-level precision / recall / F1 from IOB tags), as the GLUE and CoNLL papers report them;
question answering's exact match and F1 (SQuAD's official script) are scored per question in `tasks/qa.py`.

Each function takes host numpy arrays of every scored example (gold, predicted) and returns plain floats.
"""

import warnings

import numpy as np

from mlm_flax.tasks.data import IGNORE

# The validation metric that picks the best step, per task (higher is better).
DEFAULT_BEST = {'classification': 'accuracy', 'regression': 'pearson', 'token_classification': 'f1',
                'question_answering': 'f1'}
METRICS = {'classification': ('accuracy', 'macro_f1', 'matthews'),
           'regression': ('pearson', 'spearman', 'mse'),
           'token_classification': ('f1', 'precision', 'recall', 'accuracy'),
           # SQuAD's script, 0-100 (`tasks.qa`); v2 data adds HasAns_* / NoAns_* splits
           'question_answering': ('exact_match', 'f1')}


def classification(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
  """Accuracy, macro-averaged F1 over the classes present, and Matthews correlation (CoLA's metric)."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return {'accuracy': float(metrics.accuracy_score(labels, predictions)),
          'macro_f1': float(metrics.f1_score(labels, predictions, average='macro', zero_division=0)),
          'matthews': float(metrics.matthews_corrcoef(labels, predictions))}


def regression(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation (STS-B's metrics; 0 when the predictions are constant) and the MSE."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  labels, predictions = np.asarray(labels, np.float64), np.asarray(predictions, np.float64)
  with warnings.catch_warnings():  # constant input: scipy warns and returns nan
    warnings.simplefilter('ignore')
    pearson, spearman = stats.pearsonr(labels, predictions)[0], stats.spearmanr(labels, predictions)[0]
  nan_to_0 = lambda x: 0.0 if not np.isfinite(x) else float(x)
  return {'pearson': nan_to_0(pearson), 'spearman': nan_to_0(spearman),
          'mse': float(np.mean((labels - predictions) ** 2))}


def token_classification(labels: np.ndarray, predictions: np.ndarray, label_names: list[str]) -> dict[str, float]:
  """Entity-level F1 / precision / recall (seqeval, IOB tags named by `label_names`) and tag accuracy, over the
  positions whose gold label is not IGNORE (each word's first sub-token): `labels`, `predictions` are [rows, len]."""
  import seqeval.metrics  # pylint: disable=g-import-not-at-top
  scored = labels != IGNORE
  gold = [[label_names[t] for t in row[keep]] for row, keep in zip(labels, scored)]
  pred = [[label_names[t] for t in row[keep]] for row, keep in zip(predictions, scored)]
  with warnings.catch_warnings():  # no predicted entity: seqeval warns and returns 0
    warnings.simplefilter('ignore')
    return {'f1': float(seqeval.metrics.f1_score(gold, pred, zero_division=0)),
            'precision': float(seqeval.metrics.precision_score(gold, pred, zero_division=0)),
            'recall': float(seqeval.metrics.recall_score(gold, pred, zero_division=0)),
            'accuracy': float(seqeval.metrics.accuracy_score(gold, pred))}


def compute(task: str, labels: np.ndarray, predictions: np.ndarray, label_names: list[str] | None) -> dict[str, float]:
  """The task's metrics (`METRICS[task]`)."""
  if task == 'classification':
    return classification(labels, predictions)
  if task == 'regression':
    return regression(labels, predictions)
  return token_classification(labels, predictions, label_names)
