"""m2m.stream."""
