"""Sampling from a training workdir or a weight file: a PNG grid and an .npz of the samples.

  python -m hdit_jax.sample --weights=hdit.safetensors --num_images=16 --out=samples
  python -m hdit_jax.main --config=... --workdir=... --mode=sample
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import nnx

from hdit_jax.sampling import generate, grid


def local_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))


def sample_images(model: nnx.Module, config: Any, num_images: int, seed: int, *,
                  batch_size: int | None = None, labels: np.ndarray | None = None,
                  image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels [N]) in batches split over the local devices."""
  mesh = local_mesh()
  devices = mesh.size
  batch_size = batch_size or max(devices, min(num_images, 64))
  batch_size = -(-batch_size // devices) * devices   # a multiple of the device count
  num_classes = int(config.model.get("num_classes", 0))
  rng = np.random.default_rng(seed)
  if num_classes and labels is None:
    labels = rng.integers(0, num_classes, num_images)
  images = []
  for start in tqdm.trange(0, num_images, batch_size, desc="sampling", unit="batch"):
    count = min(batch_size, num_images - start)
    batch_labels = None
    if num_classes:
      batch_labels = np.zeros(batch_size, np.int32)
      batch_labels[:count] = labels[start:start + count]
      batch_labels = jnp.asarray(batch_labels)
    out = generate.generate(model, config, jax.random.fold_in(jax.random.key(seed), start),
                            batch_size, batch_labels, image_size=image_size, mesh=mesh)
    images.append(grid.to_uint8(np.asarray(jax.device_get(out))[:count]))
  labels = np.asarray(labels if labels is not None else np.zeros(num_images), np.int32)
  return np.concatenate(images), labels


def write_outputs(images: np.ndarray, labels: np.ndarray, out_dir: str, name: str) -> None:
  """out_dir/name.png (grid) and out_dir/name.npz (images uint8 NHWC, labels)."""
  picture = grid.image_grid(images.astype(np.float32) / 127.5 - 1)
  grid.save_png(picture, os.path.join(out_dir, f"{name}.png"))
  target = epath.Path(out_dir) / f"{name}.npz"
  with target.open("wb") as f:
    np.savez(f, images=images, labels=labels)
  logging.info("wrote %s.png and %s.npz in %s", name, name, out_dir)


def _restore_ema(config: Any, workdir: str):
  from hdit_jax.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh(config.mesh)
  model_def, abstract, _, _, _ = state_lib.setup(config, mesh, dict(config.sharding_rules))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = checkpointer.restore(abstract, None)
  checkpointer.close()
  return model_def, state, step


def sample_from_workdir(config: Any, workdir: str, num_images: int, seed: int) -> None:
  model_def, state, step = _restore_ema(config, workdir)
  model = model_def.merge(state.ema, state.buffers, deterministic=True)
  images, labels = sample_images(model, config, num_images, seed)
  if jax.process_index() == 0:
    write_outputs(images, labels, os.path.join(workdir, "samples"), f"sample_{step:08d}")


def export_from_workdir(config: Any, workdir: str) -> None:
  from hdit_jax.training.export import export_ema  # pylint: disable=import-outside-toplevel
  model_def, state, step = _restore_ema(config, workdir)
  path = os.path.join(workdir, f"ema_{step:08d}.safetensors")
  export_ema(config, model_def, state, path, write=jax.process_index() == 0)
  logging.info("wrote %s", path)
