"""Fine-tuning configuration (`mlm-flax finetune`): every key a fine-tuning run can set, with its default.

The encoder's architecture comes from `--init MODEL` (a pretraining workdir or a Hugging Face model) and is written
into `model` at start; only the keys below that do not change the params' shapes can be set here. The returned
ConfigDict is locked, so a mistyped key is an error that lists the valid ones.

Defaults are `transformers.Trainer`'s (AdamW 5e-5, no warmup, linear decay to 0, weight decay 0, 3 epochs, batch
8, gradient clipping at 1.0): on small data they give 4x the updates of BERT's GLUE recipe (2e-5, batch 32, 10%
warmup, weight decay 0.01), which underfits there (MiniLM on 462 docstrings, 5 topics: 0.681 held-out accuracy,
0.871 with these, as Trainer's defaults in PyTorch; README "Fine-tuning defaults"); on GLUE-sized data both
recipes make thousands of updates, and 5e-5 is in the BERT paper's own grid. Pass the GLUE recipe explicitly
to reproduce the paper (`--config.optimizer.*`, `--config.batch_size=32`).
"""

import ml_collections


def _optional(field_type: type) -> ml_collections.FieldReference:
  """A None default that `--config.KEY=VALUE` can still set (typed)."""
  return ml_collections.FieldReference(None, field_type=field_type)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init = _optional(str)  # the MODEL fine-tuned (set from --init): a workdir (DIR or DIR:STEP), HF folder or hub name
  c.seed = 0  # params of the head, data order and dropout; seed K of `seeds` uses seed + K
  c.seeds = 1  # >1: one run per seed in DIR/seed_K/, results.json reports the mean and std over seeds

  c.task = ml_collections.ConfigDict()
  # 'classification' (one text or a text pair -> one label), 'regression' (-> one number, STS-B style) or
  # 'token_classification' (a label per word, scored on the word's first sub-token, NER style) or
  # 'question_answering' (extractive, SQuAD format: the answer is a span of the context; `tasks/qa.py`).
  c.task.type = 'classification'
  c.task.classifier_pooling = 'cls'  # sequence tasks: the first token's state, or 'mean' over real tokens (ModernBERT)
  # Question answering (as transformers' run_qa.py): contexts longer than a window are cut into windows of
  # max_seq_length tokens overlapping by doc_stride tokens (None: min(128, max_seq_length // 4); run_qa: 128 with
  # max_seq_length 384); an answer is at most max_answer_length tokens, picked from the n_best_size best starts x
  # ends of each window. version_2_with_negative (SQuAD v2, unanswerable questions: the null answer when its score
  # beats the best span's by null_score_diff_threshold); None: on when a train or validation question has no answer.
  c.task.doc_stride = _optional(int)
  c.task.max_answer_length = 30
  c.task.n_best_size = 20
  c.task.version_2_with_negative = _optional(bool)
  c.task.null_score_diff_threshold = 0.0

  c.num_epochs = 3  # used when num_train_steps is None
  c.num_train_steps = _optional(int)  # set: train this many steps instead of num_epochs epochs
  c.batch_size = 8  # global, in examples; each epoch drops the last partial batch (reshuffled per epoch)
  c.eval_batch_size = 64  # global; every validation/test row is scored once, whatever this is
  c.max_seq_length = 128  # longer inputs are truncated (pairs: the longer text first)
  c.fsdp = 1  # devices that share one copy of params and optimizer state (as in pretraining)
  c.log_every_steps = 50
  c.eval_every_steps = _optional(int)  # None: once per epoch (and at the last step)
  c.checkpoint_every_steps = _optional(int)  # None: at every evaluation; the best step's params are kept apart
  c.max_checkpoints_to_keep = 1  # resume checkpoints; the best one (DIR/best/) is never deleted by this
  c.progress_bar = True
  # Validation metric that picks the best step (higher is better); None: accuracy (classification), pearson
  # (regression), f1 (token_classification: entity-level, seqeval; question_answering: SQuAD's token F1, 0-100).
  c.metric_for_best = _optional(str)
  c.classifier_dropout = _optional(float)  # dropout before the head; None: the encoder's model.hidden_dropout

  # Encoder keys a fine-tuning run may set (the rest of `model` is the --init model's and is filled at start).
  c.model = ml_collections.ConfigDict()
  c.model.dtype = 'auto'  # compute dtype: 'auto' (bf16 on GPU/TPU), 'float32' or 'bfloat16'
  c.model.hidden_dropout = _optional(float)  # None: the init model's
  c.model.attention_dropout = _optional(float)  # None: the init model's

  c.data = ml_collections.ConfigDict()
  c.data.dataset = ''  # a hub dataset name (e.g. 'glue', 'conll2003'), or '' with train_files
  c.data.dataset_config = _optional(str)  # e.g. 'sst2', 'mrpc', 'stsb'
  c.data.train_split = 'train'
  c.data.validation_split = 'validation'
  c.data.test_split = _optional(str)  # e.g. 'test'; scored with the best step's params when it has labels
  # Local csv / json / jsonl / parquet files (a path or glob each); they take precedence over data.dataset.
  c.data.train_files = _optional(str)
  c.data.validation_files = _optional(str)
  c.data.test_files = _optional(str)
  # Columns. None: taken from the data: `text` (or the only / the two string columns: a pair) and `label`
  # (token classification: the column of word lists, `tokens`, and of label lists, `ner_tags`/`tags`/`labels`).
  c.data.text_column = _optional(str)
  c.data.text_pair_column = _optional(str)
  c.data.label_column = _optional(str)
  # Question answering: SQuAD-format columns (answers = {"text": [...], "answer_start": [...]}, [] if none).
  c.data.question_column = 'question'
  c.data.context_column = 'context'
  c.data.answers_column = 'answers'
  # Label names in id order, comma-separated (e.g. 'O,B-PER,I-PER'): integer labels in the data are ids into
  # them, strings their names. None: a ClassLabel feature's names, else the sorted unique training labels. Token
  # classification needs entity tags (IOB / IOBES): data with integer tags (CoNLL files) must set this.
  c.data.label_names = _optional(str)
  c.data.num_proc = 1  # tokenization processes (datasets.map)
  c.data.cache_dir = _optional(str)  # hub downloads; None: ~/.cache/mlm_flax (or $MLM_FLAX_CACHE)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_ratio = 0.0  # of the training steps; used when warmup_steps is None (GLUE recipe: 0.1)
  c.optimizer.warmup_steps = _optional(int)
  c.optimizer.type = 'adamw'  # or 'stable_adamw' (as pretraining: configs/default.py)
  # After warmup: 'linear', 'cosine', 'constant', or 'wsd' (the peak until the last `decay_fraction` of the steps,
  # then a 'linear' or '1-sqrt' cool-down).
  c.optimizer.schedule = 'linear'
  c.optimizer.decay_fraction = 0.1
  c.optimizer.decay_shape = 'linear'
  c.optimizer.end_learning_rate_factor = 0.0
  c.optimizer.weight_decay = 0.0  # AdamW; never on biases and LayerNorm (1-D params) (GLUE recipe: 0.01)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0  # 0: no clipping
  # A step with a non-finite loss, gradient or param: 'skip' leaves params and optimizer state as they were (counted
  # in the train rows' `skipped_steps`), 'stop' ends the run with an error naming the step (as pretraining).
  c.optimizer.nonfinite = 'skip'
  # Layer-wise learning-rate decay (ELECTRA, DeBERTa): layer i of L gets learning_rate * layer_decay^(L + 1 - i),
  # the embeddings layer_decay^(L + 1), the head the full rate. None or 1.0: off. Typical: 0.8-0.95.
  c.optimizer.layer_decay = _optional(float)

  c.lock()
  return c
