"""m2m.soc."""
