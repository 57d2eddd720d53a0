"""ELECTRA on the CPU quick start: `configs/tiny_bert.py`'s 2-layer BERT as the discriminator, a quarter-width
generator sharing its embeddings, 15% masks (the paper's rate for small models), λ = 50.

  mlm-flax train --config configs/tiny_electra.py --workdir workdirs/tiny_electra

Eval reports the generator's masked accuracy and the discriminator's accuracy, replaced-token recall and AUC;
`mlm-flax finetune --init workdirs/tiny_electra` fine-tunes the discriminator; `mlm-flax export` writes
`ElectraForPreTraining` and the generator as `ElectraForMaskedLM` in `OUT/generator` (transformers' ELECTRA is
BERT-style, hence tiny_bert's model). `electra(c)` puts the same ELECTRA keys on any config: on `configs/tiny.py`
(ModernBERT) it trains the quick start's own architecture (experiments/objectives), which does not export to
Hugging Face ELECTRA.
"""

import ml_collections

from mlm_flax.configs import tiny_bert


def electra(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with ELECTRA's objective: 15% masks, learning rate 1e-3, the objective's defaults (a quarter-width
  generator, λ = 50)."""
  c.objective.type = 'electra'
  c.masking.rate = 0.15
  c.optimizer.learning_rate = 1e-3
  return c


def get_config():
  return electra(tiny_bert.get_config())
