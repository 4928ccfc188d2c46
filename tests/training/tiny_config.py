"""A very small class-conditional HDiT on 16x16 MNIST crops for training tests."""

from hdit_jax.config import base_config, hdit_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = hdit_model(
      input_size=(16, 16), input_channels=1, patch_size=(2, 2), depths=(1, 1), widths=(16, 32),
      d_heads=(8, 8), kernel_sizes=(3, 3), mapping_width=16, mapping_depth=1, mapping_d_ff=32,
      num_classes=10, dtype="float32", dropout_rate=(0.0, 0.1))
  c.diffusion.update(sigma_data=0.6, sigma_max=80.0)
  c.optimizer.update(lr=2e-3, weight_decay=1e-4)
  c.data.update(source="embedded", name="mnist", image_size=16, batch_size=16, num_workers=0,
                augment_prob=0.2)
  c.training.update(num_steps=12, log_every=1, checkpoint_every=4, keep_checkpoints=2,
                    keep_every=0, sample_every=0, num_sample_images=4)
  c.sampling.update(sampler="euler", steps=4)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def cli_xla_flags(devices: int = 1) -> str:
  """XLA flags for the tests' short command-line runs of this config, whose time is mostly
  compilation: `devices` CPU devices, and LLVM's optimisation level 0, which halves it (a tiny
  train step: 15 s -> 7 s)."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
