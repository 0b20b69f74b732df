"""Curation primitives: text keys, MinHash, hash shuffles and clustering on Ray blocks."""
