"""m2m.bench."""
