"""CPU-sized ModernBERT-style model, the counterpart of the quick start (`configs/tiny.py`).

ModernBERT's architecture (`configs/modernbert_base.py`) at tiny.py's scale: pre-LN, GeGLU MLP, RoPE, no biases
except the decoder's, LayerNorm eps 1e-5, and alternating attention: layer 0 global, layers 1-2 a 64-token
sliding window (half of seq 128, as ModernBERT's 128 is an eighth of its 1024). Deeper and narrower in the MLP,
as ModernBERT: 3 layers with intermediate 384 (1.5 x hidden, ModernBERT-base's 1152 / 768) instead of tiny.py's 2
layers with 1024, which gives about the same training FLOPs per token (`mlm_flax.flops.config_flops_per_token`:
12.2M vs tiny.py's 11.6M, +5%). Everything else is tiny.py's: tokenizer (WordPiece, 2048), batch 16 x 128,
40% training masks with evaluation at 15%, no dropout, steps and warmup.

Learning rate: tiny.py's 3e-3 (linear warmup, linear decay) kept after three 300-step trials (warmup 50, f32, the
built-in corpus): eval masked accuracy 0.316 at 1.5e-3, 0.318 at 3e-3 (lowest loss, 4.09), 0.193 at 6e-3.

Steps: 1,100 (warmup 157, tiny.py's 1/7), sized to a 10-minute budget on 2 CPU cores: `mlm-flax train --config
configs/tiny_modern.py` reached 0.425 eval masked accuracy (tiny.py's 15% evaluation masks) in 7 min 54 s end to
end from a cold cache on a 2-core AMD EPYC (Zen 3, AVX2, f32), where tiny.py reaches 0.310 in 8 min 51 s.
"""

from mlm_flax.configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.type = 'modernbert'
  c.model.num_layers = 3
  c.model.hidden_size = 256
  c.model.num_heads = 4
  c.model.intermediate_size = 384  # GeGLU: Wi is 256 x 768
  c.model.layer_norm_eps = 1e-5
  c.model.global_attn_every_n_layers = 3  # layer 0 full, 1 and 2 sliding
  c.model.local_attention = 64
  c.model.global_rope_theta = 160_000.0
  c.model.local_rope_theta = 10_000.0
  c.optimizer.learning_rate = 3e-3
  c.num_train_steps = 1100  # ~8 minutes of a 2-core CPU, the quick start's budget (the model is ~10% slower per step)
  c.optimizer.warmup_steps = 157  # 1/7 of the steps, as tiny.py's 200 of 1400
  return c
