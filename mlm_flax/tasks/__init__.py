"""Downstream tasks on a pretrained encoder: `model.py` (`TaskModel`: the architecture's encoder + a task head
from `mlm_flax.models.heads`; loading an encoder from a pretraining workdir or a Hugging Face folder), `data.py`
(load, check and tokenize a task's splits), `metrics.py` (scikit-learn / scipy / seqeval), `qa.py` (extractive
question answering: SQuAD windows, span post-processing, SQuAD EM/F1); `mlm_flax/finetune.py` trains them.

Importing this package does not import JAX; import `mlm_flax.tasks.model` for the model.
"""

TASKS = ('classification', 'regression', 'token_classification', 'question_answering')
