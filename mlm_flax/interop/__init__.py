"""Interop with other libraries' checkpoints: `hf.py` (Hugging Face: load, export, import into a workdir), with one
mapping module per architecture (`bert.py`, `modernbert.py`). A new architecture adds its mapping here and an
entry in `hf.MAPPINGS`.
"""
