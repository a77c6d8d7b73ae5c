"""SparVAR sparse-attention policy: static CSLA masks and plans (csla.py)."""
