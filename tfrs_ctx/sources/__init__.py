"""Data sources: the synthetic generator (the embedded default) and MovieLens-100k."""
