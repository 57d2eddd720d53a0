"""Model architectures (one module each), built by `mlm_flax.model.make_model` from `model.type`."""
