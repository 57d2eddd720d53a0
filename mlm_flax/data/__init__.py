"""Data: text sources, tokenizer, packing into rows, and the batches the trainer and evaluation read.

`sources.py` (built-in corpora in `corpora.py`, hub datasets, local files, fingerprints), `tokenizer.py`
(load or train one), `packing.py` (tokenize + pack, cached), `pipeline.py` (train/eval batches, the prefetched
train iterator; `streaming.py` for streamed corpora, `prefetch.py` for the background thread). The functions the
trainer and evaluation call are re-exported here, so call sites read `data.load_text_splits(...)`.
"""

from mlm_flax.data import packing
from mlm_flax.data.packing import PACKING_MODES, pack, pack_tokens, packed_rows, tokenizer_fingerprint
from mlm_flax.data.pipeline import (checkpoint_position, eval_batches, num_eval_batches, shape_phases, step_shape,
                                   train_batches, train_iterator)
from mlm_flax.data.sources import cache_dir, fingerprint, load_text_files, load_text_splits, tokenizer_texts

__all__ = ['PACKING_MODES', 'cache_dir', 'checkpoint_position', 'eval_batches', 'fingerprint', 'load_text_files',
           'load_text_splits', 'num_eval_batches', 'pack', 'pack_tokens', 'packed_rows', 'shape_phases', 'step_shape',
           'tokenizer_fingerprint', 'tokenizer_texts', 'train_batches', 'train_iterator']


def __getattr__(name: str):
  """`data.tokenize_calls`: the live counter of uncached tokenizations (`packing.tokenize_calls`)."""
  if name == 'tokenize_calls':
    return packing.tokenize_calls
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
