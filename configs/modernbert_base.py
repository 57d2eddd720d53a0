"""ModernBERT-base (Warner et al. 2024, arXiv 2412.13663): its sizes and its phase-1 pretraining choices.

Architecture (as the released `answerdotai/ModernBERT-base` config): 22 pre-LN layers, hidden 768, 12 heads,
GeGLU MLP of intermediate 1152 (`Wi` makes 2 x 1152 features), RoPE, every 3rd layer global attention (RoPE
base 160k), the others a 128-token sliding window (RoPE base 10k), no biases except the decoder's, LayerNorm eps
1e-5, no dropout, its own BPE tokenizer with the embedding padded to 50,368 rows (a multiple of 64).

Training (phase 1 of 3: 1.719T tokens at sequence length 1024, before context extension to 8192; the released
`yamls/main/modernbert-base.yaml`): 30% masking (evaluation at 15%), StableAdamW with peak learning rate 8e-4,
betas (0.9, 0.98), eps 1e-6, fully decoupled weight decay 1e-5 (not on biases and norms), batch 4,608
sequences, a 3B-token warmup, then a trapezoidal (warmup-stable-decay) schedule whose stable phase lasts all of
phase 1 (the 1-sqrt decay comes after context extension), seed 17.

What is approximated here:
- schedule: warmup then `constant` is phase 1's warmup-stable part exactly; the 1-sqrt decay of the later
  phases and the batch-size warmup (small batches ramping up to 4,608 over the first ~50B tokens) have no
  equivalent in our schedules (linear/cosine/constant) and are left out; warmup counted in steps of the full
  batch (3e9 / (4608 x 1024) = 636 steps);
- optimizer: AdamW with global-norm gradient clipping at 1.0 stands in for StableAdamW (AdamW with Adafactor-
  style per-parameter update clipping). Its weight decay 1e-5 is "fully decoupled" (optimi's `decouple_lr`:
  w <- w * (1 - 1e-5 * lr / peak_lr) per step), while optax's AdamW decays by lr * weight_decay; the same decay
  is weight_decay = 1e-5 / 8e-4 = 0.0125 here;
- RoPE: phase 1 used base 10k in every layer and raised the global layers' to 160k for context extension; this
  config keeps the released model's 160k / 10k (so it matches `mlm-flax import` of the Hub checkpoint); set
  `model.global_rope_theta=10000` to reproduce phase 1 exactly;
- dropout: none, as the released config (the pretraining yaml had 0.1 on the attention output only; our
  `model.attention_dropout` would also drop attention probabilities, which ModernBERT did not);
- init: Hugging Face's (normal 0.02, output projections 0.02 / sqrt(2 x layers)) for its Megatron-style one;
- data: sequences packed from whole documents as ours are (ModernBERT also packs), on whatever
  `data.dataset` says (its 2T-token mix of web, code and papers is not reproduced); only phase 1 (seq 1024) is
  configured — set `max_seq_length=8192` (and the longer phases' learning rate) for context extension.
"""

from mlm_flax.configs import default

TOKENS_PER_STEP = 4608 * 1024


def get_config():
  c = default.get_config()
  c.seed = 17
  c.batch_size = 4608  # reached after a batch-size warmup from 768 over 50B tokens (not reproduced)
  c.eval_batch_size = 256
  c.max_seq_length = 1024  # phase 1
  c.num_train_steps = round(1.719e12 / TOKENS_PER_STEP)  # ~1.7T tokens of phase 1: 364,301 steps
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000

  c.model.type = 'modernbert'
  c.model.num_layers = 22
  c.model.hidden_size = 768
  c.model.num_heads = 12
  c.model.intermediate_size = 1152  # GeGLU: Wi is 768 x 2304
  c.model.vocab_size = 50368  # the tokenizer's ~50.3k tokens padded to a multiple of 64, as released
  c.model.max_position_embeddings = 8192  # no position embeddings (RoPE); the released config's length
  c.model.hidden_act = 'gelu'
  c.model.layer_norm_eps = 1e-5
  c.model.initializer_range = 0.02
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.model.global_attn_every_n_layers = 3  # layers 0, 3, 6, ... global; the others sliding
  c.model.local_attention = 128
  c.model.global_rope_theta = 160_000.0
  c.model.local_rope_theta = 10_000.0
  # Biases left None: ModernBERT's own (only the decoder's).

  c.data.tokenizer = 'answerdotai/ModernBERT-base'  # its BPE tokenizer ([MASK]); or a local copy of it
  c.masking.rate = 0.3
  c.masking.eval_rate = 0.15  # "we always evaluate at 15% masking for consistent comparison"

  c.optimizer.learning_rate = 8e-4
  c.optimizer.warmup_steps = round(3e9 / TOKENS_PER_STEP)  # 3B tokens: 636 steps
  c.optimizer.schedule = 'constant'  # warmup-stable; see the module docstring
  c.optimizer.weight_decay = 1e-5 / 8e-4  # ModernBERT's decoupled 1e-5 in optax's lr-scaled convention: 0.0125
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.grad_clip_norm = 1.0
  return c
