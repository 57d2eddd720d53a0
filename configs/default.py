"""Base configuration: every key a run can set, with its default.

Other configs start from `get_config()` here and change values; the returned
ConfigDict is locked, so a mistyped key is an error that lists the valid ones.
"""

import dataclasses

import ml_collections

from mlm_flax.models import config as model_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 1000
  c.batch_size = 64  # global, in sequences
  # Devices that share one copy of params and optimizer state, each holding a slice (FSDP); the batch is
  # split over all devices. 1: plain data parallelism. Must divide the device count.
  c.fsdp = 1
  c.grad_accum_steps = 1  # micro-batches per update: the same update as one batch_size batch, less memory
  c.eval_batch_size = 64  # global; the last eval batch is padded, never dropped
  c.max_seq_length = 128
  # Warm-ups, as 'VALUE:STEPS,...' phases before the full value ('': none): e.g. seq_len_warmup='32:200,64:200'
  # trains 200 steps on rows of 32 tokens, 200 on rows of 64, then max_seq_length (each length its own packing
  # of the corpus and one compiled step); batch_size_warmup='4:100,8:100' likewise in sequences per step. The
  # learning rate stays a function of the step. Short rows / small batches first: more updates per second early.
  c.seq_len_warmup = ''
  c.batch_size_warmup = ''
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.max_eval_batches = 0  # 0: the whole validation split
  c.fill_mask_examples = 3  # held-out sentences shown at the end of `train`
  c.progress_bar = True
  # Warm start: 'WORKDIR' or 'WORKDIR:STEP' (default: its latest checkpoint). A new run starts from that run's
  # params (the same model shapes; its tokenizer too, unless data.tokenizer is set) with a fresh optimizer at
  # step 0. Recorded in config.json; once this run has a checkpoint of its own, resuming starts from that.
  c.init_from = ml_collections.FieldReference(None, field_type=str)

  c.logging = ml_collections.ConfigDict()
  # Also log metrics, config and final results to Weights & Biases (`pip install -e ".[wandb]"`; the run's
  # files go to WORKDIR/wandb; WANDB_MODE=offline works without a network, `wandb sync` uploads later).
  c.logging.wandb = False
  c.logging.wandb_project = 'mlm_flax'

  # Every model key, its default and what it does: `mlm_flax/models/config.py` (`ModelConfig`). Keys whose default
  # is None are FieldReferences typed by `OPTIONAL_TYPES`, so `--config.model.KEY=VALUE` can set them.
  c.model = ml_collections.ConfigDict()
  for key, value in dataclasses.asdict(model_config.ModelConfig()).items():
    c.model[key] = (ml_collections.FieldReference(None, field_type=model_config.OPTIONAL_TYPES[key])
                    if value is None else value)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'builtin:stdlib_docs'  # 'builtin:NAME', a hub name, or '' with train_files
  c.data.dataset_config = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = 'train'  # split names of a hub dataset
  c.data.validation_split = 'validation'  # absent from the dataset: carved off train (validation_fraction)
  # Local files: a path or glob of .txt/.text (one document per line), .json/.jsonl, .csv or .parquet.
  c.data.train_files = ml_collections.FieldReference(None, field_type=str)
  c.data.validation_files = ml_collections.FieldReference(None, field_type=str)
  c.data.text_column = 'text'
  # Stream the data (an IterableDataset: nothing converted on disk first) for corpora bigger than the cache.
  # Train order: a shuffle buffer of shuffle_buffer_size documents, reseeded every epoch; validation: the
  # first streaming_validation_docs documents (of the validation split, else taken off the train stream).
  c.data.streaming = False
  c.data.shuffle_buffer_size = 10_000
  c.data.streaming_validation_docs = 1000
  # 'documents': several documents per row, attention within each (segment ids), positions restarting;
  # 'group_texts': BERT/HF-style concatenation cut into full rows, attention across documents;
  # 'line_by_line': one document per row, truncated and padded.
  c.data.packing = 'documents'
  c.data.tokenizer = ml_collections.FieldReference(None, field_type=str)  # None: train one (tokenizer_type)
  c.data.tokenizer_type = 'wordpiece'  # a trained tokenizer: 'wordpiece' (BERT) or 'bpe' (byte-level, RoBERTa)
  c.data.tokenizer_vocab_size = 8192
  c.data.lowercase = True  # WordPiece only; byte-level BPE is cased
  c.data.validation_fraction = 0.05  # carved off by document when the dataset has no validation split
  c.data.num_proc = 1  # tokenization processes (datasets.map); results are cached under cache_dir
  c.data.cache_dir = ml_collections.FieldReference(None, field_type=str)  # None: ~/.cache/mlm_flax
  c.data.prefetch = 2  # batches prepared ahead on a background thread (0: in the loop)

  c.masking = ml_collections.ConfigDict()
  c.masking.rate = 0.15
  # Masking rate of evaluation (and of the fill-mask examples' metrics); None: same as `rate`. Training at
  # a higher rate gives more predictions per forward pass (Wettig et al. 2023) while eval stays at 15%.
  c.masking.eval_rate = ml_collections.FieldReference(None, field_type=float)
  # Training rate over the steps: 'constant' (`rate` throughout), or 'linear' / 'cosine' from `rate` to
  # `final_rate` over `schedule_steps` (0: the whole run), or 'step' (`rate`, then `final_rate` after
  # `schedule_steps`), e.g. rate=0.3, final_rate=0.15 as mmBERT. Traced in the step (no recompiles); the
  # prediction budget is the highest rate's. Eval keeps `eval_rate`.
  c.masking.rate_schedule = 'constant'
  c.masking.final_rate = ml_collections.FieldReference(None, field_type=float)
  c.masking.schedule_steps = 0
  c.masking.mask_prob = 0.8
  c.masking.random_prob = 0.1  # the rest stay unchanged
  # 'token': BERT's independent tokens; 'whole_word': all tokens of a word or none (WordPiece ## / BPE Ġ);
  # 'span': SpanBERT's spans of whole words, Geometric(span_p) words long, at most max_span_length.
  c.masking.strategy = 'token'
  c.masking.max_span_length = 10
  c.masking.span_p = 0.2

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  # 'adamw', or 'stable_adamw' (ModernBERT's: each tensor's step divided by max(1, RMS(g / sqrt(v)))).
  c.optimizer.type = 'adamw'
  # After warmup: 'linear', 'cosine' or 'constant' decay, or 'wsd' (warmup-stable-decay, ModernBERT's trapezoid:
  # the peak until the last `decay_fraction` of the steps, then a `decay_shape` cool-down: 'linear' or '1-sqrt').
  # With 'wsd', a run resumed with more num_train_steps before its cool-down is the run that had them all along.
  c.optimizer.schedule = 'linear'
  c.optimizer.decay_fraction = 0.1
  c.optimizer.decay_shape = 'linear'
  c.optimizer.end_learning_rate_factor = 0.0
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.grad_clip_norm = 1.0
  # A step whose loss or gradient is NaN/inf: 'skip' leaves params and optimizer state as they were
  # (counted in the `skipped_steps` metric); 'stop' ends the run with an error naming the step. Either
  # way no non-finite state is applied or checkpointed.
  c.optimizer.nonfinite = 'skip'

  # The pretraining objective (mlm_flax/objectives/): 'mlm' (masked LM), or 'electra' (replaced-token detection:
  # a generator MLM `generator_hidden_fraction` as wide and `generator_layers_fraction` as deep, sharing the
  # embeddings, fills the masks; the discriminator learns which tokens were replaced; loss = generator MLM loss
  # + disc_weight x discriminator loss, as Clark et al. 2020).
  c.objective = ml_collections.ConfigDict()
  c.objective.type = 'mlm'
  c.objective.generator_hidden_fraction = 0.25
  c.objective.generator_layers_fraction = 1.0
  c.objective.disc_weight = 50.0

  c.lock()
  return c
