"""Shapes world: a tiny procedural text-to-image world for end-to-end tests of the eraser."""
