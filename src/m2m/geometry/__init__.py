"""Geometry of splats on the unit sphere: sphere maps and von Mises-Fisher mathematics."""
