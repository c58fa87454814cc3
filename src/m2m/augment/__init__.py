"""Augmentation: Riemannian Langevin dynamics under the vMF-mixture energy of neighbouring splats."""
