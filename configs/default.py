"""Base configuration: every key a run can set, with its default.

Other configs start from `get_config()` here and change values; the returned
ConfigDict is locked, so a mistyped key is an error that lists the valid ones.
"""

import ml_collections


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
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.max_eval_batches = 0  # 0: the whole validation split
  c.fill_mask_examples = 3  # held-out sentences shown at the end of `train`
  c.progress_bar = True

  c.model = ml_collections.ConfigDict()
  c.model.type = 'bert'  # 'bert', 'roberta' (position offset, token types) or 'modernbert'
  c.model.num_layers = 4
  c.model.hidden_size = 256
  c.model.num_heads = 4
  c.model.intermediate_size = 1024
  c.model.vocab_size = ml_collections.FieldReference(None, field_type=int)  # None: from the tokenizer
  c.model.max_position_embeddings = 512
  c.model.type_vocab_size = 2
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.layer_norm_eps = 1e-12
  # 'post': BERT/RoBERTa layout (Hugging Face compatible); 'pre': pre-LN layers + a final LayerNorm,
  # which tolerates higher learning rates (Xiong et al. 2020). ModernBERT is always pre-LN.
  c.model.norm_position = 'post'
  c.model.hidden_act = 'gelu'  # exact erf GELU, as BERT (ModernBERT: the GeGLU's activation)
  c.model.initializer_range = 0.02
  c.model.pad_token_id = ml_collections.FieldReference(None, field_type=int)  # None: from the tokenizer
  # 'bfloat16': bf16 matmul inputs, f32 accumulation, f32 master params; 'auto' picks per backend.
  c.model.dtype = 'auto'  # see model.resolve_dtype
  c.model.param_dtype = 'float32'
  # 'auto': jax.nn.dot_product_attention (fused kernels) on GPU/TPU, heads-major einsums on CPU (faster
  # there); or 'einsum' / 'dot_product_attention'. Training with attention_dropout > 0 uses the einsums.
  c.model.attention = 'auto'
  # The head's matmul runs on the vocabulary padded (zero rows) to a multiple of this, aligned for GPU
  # tensor cores / TPU MXUs; logits, params and exports keep the real size. 1 turns it off.
  c.model.vocab_multiple = 128
  c.model.remat = False  # recompute each layer in the backward pass: less activation memory, ~1/3 more FLOPs
  c.model.tie_word_embeddings = True  # False: the MLM decoder is its own [vocab, hidden] param (HF untied)
  # ModernBERT (model.type='modernbert'; BERT/RoBERTa ignore these). Each layer attends to its whole document
  # ('full_attention') or to the tokens at most local_attention // 2 away ('sliding_attention').
  c.model.layer_types = ''  # comma-separated, one per layer; '': every global_attn_every_n_layers-th layer full
  c.model.global_attn_every_n_layers = 3  # from layer 0 (Hugging Face's rule); the others sliding
  c.model.local_attention = 128  # the whole sliding window, half on each side (Hugging Face's definition)
  c.model.global_rope_theta = 160_000.0  # RoPE base of full-attention layers
  c.model.local_rope_theta = 10_000.0  # RoPE base of sliding-window layers
  # Biases; None: the architecture's own (BERT: all; ModernBERT: only the decoder's).
  c.model.attention_bias = ml_collections.FieldReference(None, field_type=bool)  # QKV and attention output
  c.model.mlp_bias = ml_collections.FieldReference(None, field_type=bool)
  c.model.norm_bias = ml_collections.FieldReference(None, field_type=bool)  # LayerNorm shift
  c.model.decoder_bias = ml_collections.FieldReference(None, field_type=bool)  # MLM decoder (tied embedding)
  c.model.classifier_bias = ml_collections.FieldReference(None, field_type=bool)  # the head's dense layer

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
  c.optimizer.schedule = 'linear'  # decay after warmup: 'linear', 'cosine' or 'constant'
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

  c.lock()
  return c
