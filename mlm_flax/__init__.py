"""mlm_flax: masked-language-model pretraining in pure JAX/Flax."""

__version__ = "0.1.0"
