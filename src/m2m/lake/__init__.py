"""m2m.lake."""
