"""`grc import-hf` (filled in by the HF import work)."""
