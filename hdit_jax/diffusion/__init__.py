"""Diffusion as pure functions over a model's apply: EDM preconditioning, losses, noise, samplers."""
