"""Downstream tasks: the task model (`model.py`: encoder + head), the data (`data.py`: load, check, tokenize) and
the metrics (`metrics.py`); `mlm_flax/finetune.py` trains them."""
