"""Evaluators: metrics of generated images (FID, CLIP score, the shapes oracle) behind one registry."""
