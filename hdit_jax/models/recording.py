"""Intermediate values of a model by module path, as PyTorch's forward hooks give them.

  with record_activations(model) as acts:
    model(x, sigma)
  acts["down_levels.0.0.self_attn"].output, acts["mapping"].input

Paths are the modules' state paths, which are also the official code's module names (the weight
conversion is a rename), so a reference recorded by hooks on any official module compares with
the same key here. `input` is a call's first positional argument. A transformer level (a list of
layers, run by the model) is recorded under its path with its output only. Eager calls only:
under `jit` the records would be tracers; with `model.remat` the layers run as copies, and only
the levels' outputs and the modules outside the levels are recorded. One recording at a time.
"""

import contextlib
import contextvars
from typing import Any, Iterator, NamedTuple

from flax import nnx

# (the recorded model, its records) while a recording is on.
_RECORDING: contextvars.ContextVar[tuple[Any, dict] | None] = contextvars.ContextVar(
    "recording", default=None)


class Record(NamedTuple):
  input: Any
  output: Any


def note_output(model: nnx.Module, path: str, output: Any) -> None:
  """Record the output of a part of `model` that is not a module call (a level's layers)."""
  recording = _RECORDING.get()
  if recording is not None and recording[0] is model:
    recording[1][path] = Record(None, output)


@contextlib.contextmanager
def record_activations(model: nnx.Module) -> Iterator[dict[str, Record]]:
  """Within the block, every call of one of `model`'s submodules is recorded by its path."""
  modules = [(".".join(str(p) for p in path), module)
             for path, module in nnx.iter_modules(model) if path]
  paths = {id(module): path for path, module in modules}
  records: dict[str, Record] = {}
  patched = {}
  for _, module in modules:
    cls = type(module)
    original = cls.__dict__.get("__call__")
    if original is None or cls in patched:
      continue

    def call(self, *args, _original=original, **kwargs):
      out = _original(self, *args, **kwargs)
      path = paths.get(id(self))
      recording = _RECORDING.get()
      if path is not None and recording is not None and recording[1] is records:
        # Assigned after the call: a subclass calling its parent's __call__ ends last.
        records[path] = Record(args[0] if args else None, out)
      return out

    patched[cls] = original
    cls.__call__ = call
  token = _RECORDING.set((model, records))
  try:
    yield records
  finally:
    _RECORDING.reset(token)
    for cls, original in patched.items():
      cls.__call__ = original
