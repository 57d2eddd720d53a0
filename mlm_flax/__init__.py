"""mlm_flax: masked-language-model pretraining in pure JAX/Flax."""

from mlm_flax import hostmem as _hostmem

_hostmem.keep_freed_memory()  # before JAX's CPU threads allocate: see hostmem.py

__version__ = "0.1.0"
