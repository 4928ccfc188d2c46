"""Reading pytorch-fid's Inception weight file and copying it into the NNX FID Inception.

The file is `pt_inception-2015-12-05-6726825d.pth`, a plain PyTorch state dict (read only when
torch is importable), or the same state dict saved as safetensors (see `CONVERT_COMMAND`).
Loading is a rename: `X.conv.weight` [O, I, kh, kw] -> `X.conv.kernel` [kh, kw, I, O],
`X.bn.weight/bias/running_mean/running_var` -> `X.bn.scale/bias/mean/var`. The classifier
(`fc.*`) and `num_batches_tracked` counters are not used for pool3 features and are skipped.
"""

import os
import tempfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import numpy as st_numpy

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
SAFETENSORS_NAME = "pt_inception-2015-12-05.safetensors"

# One-off conversion of the .pth to safetensors (needs torch and safetensors, run where the .pth
# is). `.contiguous()` because safetensors refuses strided views.
CONVERT_CODE = (
    "import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in "
    f"torch.load('{PTH_NAME}', map_location='cpu', weights_only=True).items() "
    f"if not k.startswith('fc.')}}, '{SAFETENSORS_NAME}')")
CONVERT_COMMAND = f'python -c "{CONVERT_CODE}"'

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _skipped(key: str) -> bool:
  return key.startswith("fc.") or key.endswith("num_batches_tracked")


def _missing_file_message(path: str) -> str:
  return (f"FID Inception weights not found: {path}\n"
          f"Download pytorch-fid's weight file {PTH_NAME} from\n  {FID_WEIGHTS_URL}\n"
          "and pass its path (reading a .pth needs PyTorch), or convert it once to safetensors "
          f"with\n  {CONVERT_COMMAND}")


def _read_pth(path: str) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch: pip install torch, or convert the file to "
                      f"safetensors where torch is installed:\n  {CONVERT_COMMAND}") from e
  # weights_only: unpickle tensors and plain containers only.
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items() if not _skipped(k)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """pytorch-fid's state dict as float32 numpy (PyTorch names and layouts), less fc/counters.

  `*.safetensors` is read with safetensors.numpy; anything else as a torch `.pth`.
  """
  path = os.fspath(path)
  if not epath.Path(path).is_file():   # local or gs://
    raise FileNotFoundError(_missing_file_message(path))
  if path.endswith(".safetensors"):
    state = st_numpy.load(epath.Path(path).read_bytes())
  elif "://" in path:
    with tempfile.NamedTemporaryFile(suffix=".pth") as local:   # torch.load wants a file
      local.write(epath.Path(path).read_bytes())
      local.flush()
      state = _read_pth(local.name)
  else:
    state = _read_pth(path)
  return {k: np.asarray(v, np.float32) for k, v in state.items() if not _skipped(k)}


def _torch_name(path: tuple[Any, ...]) -> tuple[str, bool]:
  """State-dict key of an NNX variable path, and whether it is a conv kernel (OIHW <-> HWIO)."""
  *module, leaf = (str(p) for p in path)
  prefix = ".".join(module)
  if leaf == "kernel":
    return f"{prefix}.weight", True
  return f"{prefix}.{_BN_NAMES[leaf]}", False


def _targets(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  out = {}
  for path, var in nnx.to_flat_state(state):
    name, is_kernel = _torch_name(path)
    out[name] = (var, is_kernel)
  return out


def _shorten(keys: list[str], n: int = 10) -> str:
  return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_dict_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copy a pytorch-fid state dict into `model` in place. Keys and shapes must match exactly.

  Raises ValueError naming the missing, unexpected and mis-shaped keys.
  """
  targets = _targets(model)
  given = {k: v for k, v in state_dict.items() if not _skipped(k)}
  missing = sorted(set(targets) - set(given))
  unexpected = sorted(set(given) - set(targets))
  values, bad_shapes = {}, []
  for name in sorted(set(targets) & set(given)):
    var, is_kernel = targets[name]
    value = np.asarray(given[name], np.float32)
    value = value.transpose(2, 3, 1, 0) if is_kernel and value.ndim == 4 else value
    if value.shape != var.shape:
      h, w, i, o = var.shape if is_kernel else (0,) * 4
      want = (o, i, h, w) if is_kernel else var.shape
      bad_shapes.append(f"{name} {tuple(np.shape(given[name]))} (expected {tuple(want)})")
    values[name] = value
  if missing or unexpected or bad_shapes:
    problems = [f"{what}: {_shorten(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected),
                 ("wrong shape", bad_shapes)) if keys]
    raise ValueError("state dict does not match the FID Inception: " + "; ".join(problems))
  for name, value in values.items():
    var, _ = targets[name]
    var[...] = jnp.asarray(value)
