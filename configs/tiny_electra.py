"""ELECTRA on the CPU quick start: `configs/tiny_bert.py`'s 2-layer BERT as the discriminator, a quarter-width
generator sharing its embeddings, 15% masks (the paper's rate for small models), λ = 50.

  mlm-flax train --config configs/tiny_electra.py --workdir workdirs/tiny_electra

Eval reports the generator's masked accuracy and the discriminator's accuracy, replaced-token recall and AUC;
`mlm-flax finetune --init workdirs/tiny_electra` fine-tunes the discriminator; `mlm-flax export` writes
`ElectraForPreTraining` and the generator as `ElectraForMaskedLM` in `OUT/generator`.
"""

from mlm_flax.configs import tiny_bert


def get_config():
  c = tiny_bert.get_config()
  c.objective.type = 'electra'
  c.masking.rate = 0.15
  c.optimizer.learning_rate = 1e-3
  return c
