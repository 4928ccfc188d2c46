"""Typed architecture specs for HDiT, built from ml_collections configs or k-diffusion JSON configs.

Every check that a config can fail is made here, before anything is traced, with an error that
names the offending key.
"""

import dataclasses
from typing import Any, Mapping

ATTENTION_KINDS = ("global", "neighborhood", "shifted-window", "none")
FEED_FORWARDS = ("geglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "sincos")
SKIPS = ("lerp", "add", "concat")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  kind: str = "global"
  d_head: int = 64
  kernel_size: int = 7   # neighborhood levels
  window_size: int = 8   # shifted-window levels


@dataclasses.dataclass(frozen=True)
class LevelSpec:
  depth: int
  width: int
  d_ff: int
  attention: AttentionSpec
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class MappingSpec:
  depth: int = 2
  width: int = 256
  d_ff: int = 768
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class HDiTSpec:
  """The hourglass: levels[0] is the finest (patch grid), levels[-1] the middle (coarsest).

  `num_classes` counts dataset classes; a class-conditional model's embedding has one more row,
  the null class `num_classes` used for classifier-free guidance. 0 means unconditional.
  `feed_forward`, `position_embedding` and `skip` other than the defaults are the paper's
  ablation baselines (section 4 of the paper), not part of the final HDiT.
  """
  levels: tuple[LevelSpec, ...]
  mapping: MappingSpec = MappingSpec()
  in_channels: int = 3
  out_channels: int = 3
  patch_size: tuple[int, int] = (4, 4)
  num_classes: int = 0
  mapping_cond_dim: int = 0
  feed_forward: str = "geglu"
  position_embedding: str = "rope"
  skip: str = "lerp"

  def __post_init__(self):
    _check(len(self.levels) >= 1, "model.depths: at least one level is needed")
    for i, level in enumerate(self.levels):
      a = level.attention
      _check(a.kind in ATTENTION_KINDS,
             f"model.attention[{i}]: {a.kind!r} is not one of {ATTENTION_KINDS}")
      _check(level.depth >= 1, f"model.depths[{i}] must be >= 1, got {level.depth}")
      _check(level.width % a.d_head == 0,
             f"model.widths[{i}] = {level.width} is not a multiple of d_heads[{i}] = {a.d_head}")
      _check(a.d_head % 8 == 0 or a.kind == "none" or self.position_embedding != "rope",
             f"model.d_heads[{i}] = {a.d_head}: axial RoPE needs a multiple of 8")
      _check(0.0 <= level.dropout < 1.0, f"model.dropout_rate[{i}] must be in [0, 1)")
    _check(self.mapping.width % 2 == 0,
           f"model.mapping_width must be even (Fourier features), got {self.mapping.width}")
    _check(self.feed_forward in FEED_FORWARDS,
           f"model.feed_forward: {self.feed_forward!r} is not one of {FEED_FORWARDS}")
    _check(self.position_embedding in POSITION_EMBEDDINGS,
           f"model.position_embedding: {self.position_embedding!r} not in {POSITION_EMBEDDINGS}")
    _check(self.skip in SKIPS, f"model.skip: {self.skip!r} is not one of {SKIPS}")
    _check(self.position_embedding != "sincos" or self.levels[0].width % 4 == 0,
           "model.widths[0] must be a multiple of 4 for the sin-cos position embedding")

  def token_grids(self, height: int, width: int) -> list[tuple[int, int]]:
    """Token grid of every level for an image of (height, width) pixels; raises if not divisible."""
    ph, pw = self.patch_size
    factor_h, factor_w = ph * 2 ** (len(self.levels) - 1), pw * 2 ** (len(self.levels) - 1)
    if height % factor_h or width % factor_w:
      raise ValueError(
          f"image size {height}x{width} cannot be divided by this model: with patch size "
          f"{ph}x{pw} and {len(self.levels)} levels, height must be a multiple of {factor_h} "
          f"and width a multiple of {factor_w}")
    grids = [(height // ph // 2 ** i, width // pw // 2 ** i) for i in range(len(self.levels))]
    for i, ((h, w), level) in enumerate(zip(grids, self.levels)):
      a = level.attention
      if a.kind == "neighborhood" and (h < a.kernel_size or w < a.kernel_size):
        raise ValueError(f"level {i}: neighborhood kernel {a.kernel_size} is larger than its "
                         f"{h}x{w} token grid (image {height}x{width})")
      if a.kind == "shifted-window" and (h % a.window_size or w % a.window_size):
        raise ValueError(f"level {i}: window size {a.window_size} does not divide its "
                         f"{h}x{w} token grid (image {height}x{width})")
    return grids


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _per_level(cfg: Mapping[str, Any], key: str, n: int, default: Any) -> list[Any]:
  """A per-level setting: a scalar broadcast to every level, or a sequence of length n."""
  value = cfg.get(key, default)
  if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
    value = default
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"model.{key} has {len(value)} entries but model.depths has {n} levels")
    return list(value)
  return [value] * n


MODEL_KEYS = frozenset({
    "type", "input_size", "input_channels", "patch_size", "depths", "widths", "d_ffs",
    "attention", "d_heads", "kernel_sizes", "window_sizes", "dropout_rate", "mapping_width",
    "mapping_depth", "mapping_d_ff", "mapping_dropout_rate", "mapping_cond_dim", "num_classes",
    "feed_forward", "position_embedding", "skip", "dtype", "param_dtype", "remat",
    "attention_implementation", "qk_implementation"})


def hdit_spec_from_config(cfg: Mapping[str, Any]) -> HDiTSpec:
  """HDiTSpec from the `model` section of an hdit-jax config (see configs/imagenet256.py)."""
  unknown = set(cfg.keys()) - MODEL_KEYS
  if unknown:
    raise ValueError(f"unknown model config keys: {sorted(unknown)}; known: {sorted(MODEL_KEYS)}")
  for key in ("depths", "widths"):
    if key not in cfg:
      raise ValueError(f"model.{key} is required")
  depths, widths = list(cfg["depths"]), list(cfg["widths"])
  n = len(depths)
  if len(widths) != n:
    raise ValueError(f"model.widths has {len(widths)} entries but model.depths has {n}")
  kinds = _per_level(cfg, "attention", n, ["neighborhood"] * (n - 1) + ["global"])
  d_heads = _per_level(cfg, "d_heads", n, 64)
  kernels = _per_level(cfg, "kernel_sizes", n, 7)
  windows = _per_level(cfg, "window_sizes", n, 8)
  d_ffs = _per_level(cfg, "d_ffs", n, None)
  dropouts = _per_level(cfg, "dropout_rate", n, 0.0)
  levels = tuple(
      LevelSpec(depth=int(depths[i]), width=int(widths[i]),
                d_ff=int(d_ffs[i]) if d_ffs[i] else 3 * int(widths[i]),
                attention=AttentionSpec(str(kinds[i]), int(d_heads[i]), int(kernels[i]),
                                        int(windows[i])),
                dropout=float(dropouts[i]))
      for i in range(n))
  mapping_width = int(cfg.get("mapping_width", 256))
  channels = int(cfg.get("input_channels", 3))
  return HDiTSpec(
      levels=levels,
      mapping=MappingSpec(depth=int(cfg.get("mapping_depth", 2)), width=mapping_width,
                          d_ff=int(cfg.get("mapping_d_ff") or 3 * mapping_width),
                          dropout=float(cfg.get("mapping_dropout_rate", 0.0))),
      in_channels=channels, out_channels=channels,
      patch_size=_pair(cfg.get("patch_size", (4, 4)), "patch_size"),
      num_classes=int(cfg.get("num_classes", 0)),
      mapping_cond_dim=int(cfg.get("mapping_cond_dim", 0)),
      feed_forward=str(cfg.get("feed_forward", "geglu")),
      position_embedding=str(cfg.get("position_embedding", "rope")),
      skip=str(cfg.get("skip", "lerp")))


def _pair(value: Any, key: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  if len(value) != 2:
    raise ValueError(f"model.{key} must be an int or a pair, got {value!r}")
  return (int(value[0]), int(value[1]))


def config_from_kdiffusion(config: Mapping[str, Any]) -> dict[str, Any]:
  """hdit-jax `model` config entries from a k-diffusion config ({'model': ..., 'dataset': ...}).

  Applies k-diffusion's defaults for `image_transformer_v2` (d_ffs 3x width, NA 64/k7 levels and a
  global last level, d_head 64, kernel 7, mapping 256/2/768, dropout 0).
  """
  model = config["model"] if "model" in config else config
  if model.get("type") != "image_transformer_v2":
    raise ValueError(f"only k-diffusion image_transformer_v2 models convert, got "
                     f"type {model.get('type')!r}")
  n = len(model["depths"])
  attns = model.get("self_attns") or (
      [{"type": "neighborhood"}] * (n - 1) + [{"type": "global"}])
  for a in attns:
    if a["type"] not in ATTENTION_KINDS:
      raise ValueError(f"unsupported k-diffusion self_attn type {a['type']!r}")
  dropout = model.get("dropout_rate")
  dropout = [0.0] * n if dropout is None else (
      list(dropout) if isinstance(dropout, (list, tuple)) else [float(dropout)] * n)
  mapping_width = model.get("mapping_width", 256)
  dataset = config.get("dataset", {})
  return dict(
      type="hdit",
      input_size=_pair(model["input_size"], "input_size"),
      input_channels=model["input_channels"],
      patch_size=_pair(model["patch_size"], "patch_size"),
      depths=tuple(model["depths"]),
      widths=tuple(model["widths"]),
      d_ffs=tuple(model.get("d_ffs") or [3 * w for w in model["widths"]]),
      attention=tuple(a["type"] for a in attns),
      d_heads=tuple(a.get("d_head", 64) for a in attns),
      kernel_sizes=tuple(a.get("kernel_size", 7) for a in attns),
      window_sizes=tuple(a.get("window_size", 8) for a in attns),
      dropout_rate=tuple(dropout),
      mapping_width=mapping_width,
      mapping_depth=model.get("mapping_depth", 2),
      mapping_d_ff=model.get("mapping_d_ff") or 3 * mapping_width,
      mapping_dropout_rate=model.get("mapping_dropout_rate", 0.0),
      mapping_cond_dim=model.get("mapping_cond_dim", 0),
      num_classes=dataset.get("num_classes", 0),
  )


def config_to_kdiffusion(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The k-diffusion `model` section that builds the same network as an hdit-jax model config."""
  spec = hdit_spec_from_config(cfg)
  if (spec.feed_forward, spec.position_embedding, spec.skip) != ("geglu", "rope", "lerp"):
    raise ValueError("ablation options (feed_forward, position_embedding, skip) have no "
                     "k-diffusion image_transformer_v2 equivalent")
  attns = []
  for level in spec.levels:
    a = level.attention
    entry = {"type": a.kind, "d_head": a.d_head}
    if a.kind == "neighborhood":
      entry["kernel_size"] = a.kernel_size
    if a.kind == "shifted-window":
      entry["window_size"] = a.window_size
    attns.append(entry)
  return {
      "type": "image_transformer_v2",
      "input_channels": spec.in_channels,
      "input_size": list(cfg.get("input_size", (0, 0))),
      "patch_size": list(spec.patch_size),
      "depths": [lv.depth for lv in spec.levels],
      "widths": [lv.width for lv in spec.levels],
      "d_ffs": [lv.d_ff for lv in spec.levels],
      "self_attns": attns,
      "dropout_rate": [lv.dropout for lv in spec.levels],
      "mapping_width": spec.mapping.width,
      "mapping_depth": spec.mapping.depth,
      "mapping_d_ff": spec.mapping.d_ff,
      "mapping_dropout_rate": spec.mapping.dropout,
      "mapping_cond_dim": spec.mapping_cond_dim,
  }
