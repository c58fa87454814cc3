"""Consolidation: near-duplicate groups, their merge into heavier splats, and criticality."""
