"""Sampling: images from a model with any k-diffusion sampler, guidance, grids, the CLI."""
