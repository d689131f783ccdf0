"""Evaluation: samplers, classifier-free guidance, distributed generation, FID and friends, checkpoint import."""
