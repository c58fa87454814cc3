"""Importance sampling: the plan contract, score-based and loss-fed samplers, shared priorities."""
