"""Model FLOPs per token and the device's peak, for MFU (model FLOPs utilisation).

MFU counts the FLOPs the MLM objective *needs* (PaLM, Chowdhery et al. 2022, app. B), not what an
implementation happens to do: a matmul of [m, k] x [k, n] is 2mkn FLOPs forward and twice that
backward, so a training token costs 6 FLOPs per weight it passes through. Per token of a sequence
of length `s` in a model of `n` layers, hidden `h`, FFN `f`, vocabulary `v`:

  encoder    6 * n * (4h^2 + 2hf)            QKV + output projections, FFN
  attention  6 * n * 2 * s * h               scores (QK^T) and context (PV), full s x s
  MLM head   6 * r * (h^2 + h v)             transform + tied decoder, at the masked fraction r only

A gated MLP (`model.mlp` 'geglu' or 'swiglu', on any architecture; ModernBERT's own is GeGLU) has three h x f
matmuls (6 * n * (4h^2 + 3hf)); a ModernBERT sliding-window layer attends to at most 2 * (local_attention // 2) + 1
tokens instead of s. Each architecture says which applies (`flops_terms` of its module in `mlm_flax/models/`).

Embedding lookups, norms, softmax and the optimizer are not counted. A step that computes the head
at every position (Hugging Face) does more work than this and gets no credit for it.
"""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s of accelerators, by `device_kind` prefix (vendor datasheets, no sparsity).
_KNOWN_PEAKS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA L4': 121e12,
    'NVIDIA A10': 125e12, 'Tesla V100': 125e12, 'Tesla T4': 65e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12,
    'TPU v3': 123e12, 'TPU v2': 45e12,
}


def train_flops_per_token(num_layers: int, hidden_size: int, intermediate_size: int, vocab_size: int,
                          seq_len: int, masked_fraction: float, glu: bool = False,
                          attended: tuple[int, ...] | None = None) -> float:
  """Model FLOPs of one training token (forward + backward); see the module docstring.

  `glu`: gated MLP (three h x f matmuls); `attended`: tokens each layer attends to (default: all `seq_len`).
  """
  h, f = hidden_size, intermediate_size
  encoder = 6 * num_layers * (4 * h * h + (3 if glu else 2) * h * f)
  attention = 6 * 2 * h * (sum(attended) if attended is not None else num_layers * seq_len)
  head = 6 * masked_fraction * (h * h + h * vocab_size)
  return float(encoder + attention + head)


def config_flops_per_token(config) -> float:
  """`train_flops_per_token` for a resolved run config (evaluation's 15% is not what trains); the architecture
  (`mlm_flax.models`) says how its MLP and attention count (`flops_terms`). ELECTRA: the generator's MLM FLOPs
  plus the discriminator's encoder and its one-logit head on every token."""
  from mlm_flax import models  # pylint: disable=g-import-not-at-top
  from mlm_flax.objectives import objective_type  # pylint: disable=g-import-not-at-top
  masking = config.masking  # the head runs on the prediction budget, set by the highest scheduled rate
  scheduled = masking.get('rate_schedule', 'constant') != 'constant' and masking.get('final_rate') is not None
  rate = max(masking.rate, masking.final_rate) if scheduled else masking.rate

  def mlm_flops(model: dict) -> tuple[float, models.ModelConfig]:
    m = models.ModelConfig.from_dict(model)
    terms = models.architecture(m.type).flops_terms(m, config.max_seq_length)
    return train_flops_per_token(m.num_layers, m.hidden_size, m.intermediate_size, m.vocab_size,
                                 config.max_seq_length, rate, **terms), m
  flops, m = mlm_flops(config.model)
  if objective_type(config) != 'electra':
    return flops
  from mlm_flax.objectives import electra  # pylint: disable=g-import-not-at-top
  h = m.hidden_size
  generator, _ = mlm_flops(electra.generator_model_config(config.model, config.objective))
  return flops - 6 * rate * (h * h + h * m.vocab_size) + 6 * (h * h + h) + generator


def measure_matmul_peak(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted n^3 matmuls on the default device (f32 accumulation)."""
  a = jnp.ones((n, n), dtype)
  dot = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  dot(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def peak_flops() -> tuple[float, str]:
  """Peak FLOP/s of all devices together, and where the figure comes from.

  Accelerators: the datasheet dense bf16 figure by device kind. CPUs: the faster of an f32 and a
  bf16 (f32-accumulating) 1024^3 matmul measured here, so MFU is against this machine's best.
  """
  device = jax.devices()[0]
  for prefix, peak in _KNOWN_PEAKS.items():
    if device.device_kind.startswith(prefix):
      return peak * jax.device_count(), f'datasheet ({device.device_kind})'
  if device.platform == 'cpu':  # host-platform devices share the cores: one machine-wide figure
    return max(measure_matmul_peak(d, n=1024) for d in ('float32', 'bfloat16')), 'measured matmul'
  return float('nan'), f'unknown ({device.device_kind})'
