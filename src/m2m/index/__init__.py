"""m2m.index."""
