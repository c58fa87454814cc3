"""m2m.cli."""
