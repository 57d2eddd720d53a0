"""Hand-written kernels XLA calls through its FFI, where a library beats XLA's own code on some backend (today:
oneDNN's bf16 matmuls on CPU, `onednn.py`). Each module says when it runs and how to turn it off."""
