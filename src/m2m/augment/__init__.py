"""Augmentation: exact vMF and neighbourhood-mixture draws, and a Riemannian Langevin kernel that leaves
the vMF mixture of neighbouring splats invariant (short chains stay in the row's own component at d >= 64)."""
