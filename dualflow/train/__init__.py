"""Training code.  For now: the offline digits demo behind ``scripts/train.py``."""
