"""hdit_kernels: attention kernels for hdit-jax. Depends on jax alone."""
