"""Near-duplicate search: duplicate groups, their merge into heavier splats, and criticality."""
