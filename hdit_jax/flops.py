"""Analytic parameter and forward-MAC counter for HDiT and DiT (also a CLI).

MACs (multiply-accumulates) per image, the convention of the HDiT and DiT papers and of
k-diffusion's counter: a linear layer costs tokens x in x out, attention costs
tokens x keys-per-query x (d_qk + d_v) summed over heads. Elementwise work (norms, RoPE,
softmax, activations) is not counted.

Kinds: `linear` = token-wise projections (patch in/out, qkv, attention out, feed-forward,
merges, splits); `attention` = the q.k and attention-weighted v products; `other` = per-image
conditioning (Fourier-feature projections, mapping network, AdaRMSNorm / adaLN modulations).

  python -m hdit_jax.flops --config=configs/imagenet256.py [--json]
"""

import collections
import json
from typing import Any, Mapping

from absl import app, flags
from ml_collections import config_flags

from hdit_jax.models.spec import HDiTSpec, hdit_spec_from_config


class Tally:
  """Accumulates MACs by (group, kind) and parameters."""

  def __init__(self):
    self.macs = collections.defaultdict(float)
    self.params = 0

  def linear(self, group: str, tokens: int, fan_in: int, fan_out: int, kind: str = "linear",
             bias: bool = False) -> None:
    self.macs[group, kind] += tokens * fan_in * fan_out
    self.params += fan_in * fan_out + (fan_out if bias else 0)

  def attention(self, group: str, queries: int, keys_per_query: int, width: int) -> None:
    # q.k and p.v over all heads: heads * d_head = width for both.
    self.macs[group, "attention"] += queries * keys_per_query * 2 * width

  def result(self) -> dict[str, Any]:
    by_group, by_kind = collections.defaultdict(float), collections.defaultdict(float)
    for (group, kind), macs in self.macs.items():
      by_group[group] += macs / 1e9
      by_kind[kind] += macs / 1e9
    return {"params": self.params, "gmacs_per_image": sum(by_kind.values()),
            "gmacs_by_group": dict(by_group),
            "gmacs_by_kind": {k: by_kind.get(k, 0.0) for k in ("linear", "attention", "other")}}


def hdit_counts(spec: HDiTSpec, height: int, width: int) -> dict[str, Any]:
  """Parameters and per-image forward MACs of an HDiT at an image size of height x width."""
  grids = spec.token_grids(height, width)
  t = Tally()
  m, ph, pw = spec.mapping.width, *spec.patch_size
  d0 = spec.levels[0].width
  t.linear("stem", grids[0][0] * grids[0][1], spec.in_channels * ph * pw, d0)      # patch_in
  t.linear("stem", grids[0][0] * grids[0][1], d0, spec.out_channels * ph * pw)     # patch_out
  t.params += d0                                                                  # out_norm
  t.linear("mapping", 1, m, m, "other")                                           # time_in_proj
  t.linear("mapping", 1, m, m, "other")                                           # aug_in_proj
  if spec.mapping_cond_dim:
    t.linear("mapping", 1, spec.mapping_cond_dim, m, "other")
  if spec.num_classes:
    t.params += (spec.num_classes + 1) * m                                        # class_emb
  t.params += 2 * m                                                               # in/out norms
  for _ in range(spec.mapping.depth):
    t.params += m
    t.linear("mapping", 1, m, 2 * spec.mapping.d_ff, "other")
    t.linear("mapping", 1, spec.mapping.d_ff, m, "other")
  last = len(spec.levels) - 1
  for i, (level, (h, w)) in enumerate(zip(spec.levels, grids)):
    group, tokens, d = f"level{i}", h * w, level.width
    layers = level.depth if i == last else 2 * level.depth
    a = level.attention
    for _ in range(layers):
      if a.kind != "none":
        t.linear(group, 1, m, d, "other")                                         # AdaRMSNorm
        t.linear(group, tokens, d, 3 * d)
        t.linear(group, tokens, d, d)
        t.params += d // a.d_head                                                 # scale
        keys = {"global": tokens, "neighborhood": a.kernel_size ** 2,
                "shifted-window": a.window_size ** 2}[a.kind]
        t.attention(group, tokens, keys, d)
      t.linear(group, 1, m, d, "other")
      up = 2 * level.d_ff if spec.feed_forward == "geglu" else level.d_ff
      t.linear(group, tokens, d, up)
      t.linear(group, tokens, level.d_ff, d)
    if i < last:
      coarse_tokens, d_next = grids[i + 1][0] * grids[i + 1][1], spec.levels[i + 1].width
      t.linear(group, coarse_tokens, 4 * d, d_next)                               # merge
      t.linear(group, coarse_tokens, d_next, 4 * d)                               # split
      if spec.skip == "lerp":
        t.params += 1
      elif spec.skip == "concat":
        t.linear(group, tokens, 2 * d, d)
  return t.result()


def dit_counts(spec: Any, height: int, width: int) -> dict[str, Any]:
  """Parameters and per-image forward MACs of a DiT (adaLN-Zero) at height x width pixels."""
  p, d = spec.patch_size, spec.width
  if height % p or width % p:
    raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
  tokens = (height // p) * (width // p)
  out_channels = spec.in_channels * (2 if spec.learn_sigma else 1)
  hidden = int(d * spec.mlp_ratio)
  t = Tally()
  t.linear("stem", tokens, p * p * spec.in_channels, d, bias=True)               # x_embedder
  t.linear("stem", 1, spec.frequency_embedding_size, d, "other", bias=True)      # t_embedder
  t.linear("stem", 1, d, d, "other", bias=True)
  if spec.num_classes:
    t.params += (spec.num_classes + 1) * d
  for _ in range(spec.depth):
    t.linear("blocks", 1, d, 6 * d, "other", bias=True)                          # adaLN
    t.linear("blocks", tokens, d, 3 * d, bias=True)
    t.linear("blocks", tokens, d, d, bias=True)
    t.attention("blocks", tokens, tokens, d)
    t.linear("blocks", tokens, d, hidden, bias=True)
    t.linear("blocks", tokens, hidden, d, bias=True)
  t.linear("stem", 1, d, 2 * d, "other", bias=True)                              # final adaLN
  t.linear("stem", tokens, d, p * p * out_channels, bias=True)
  return t.result()


def count(model_cfg: Mapping[str, Any], image_size: tuple[int, int] | None = None
          ) -> dict[str, Any]:
  """Counts for a config's `model` section at `image_size` (default: model.input_size)."""
  height, width = image_size or tuple(model_cfg["input_size"])
  if model_cfg.get("type", "hdit") == "dit":
    from hdit_jax.models import dit  # pylint: disable=import-outside-toplevel
    return dit_counts(dit.dit_spec_from_config(model_cfg), height, width)
  return hdit_counts(hdit_spec_from_config(model_cfg), height, width)


def format_table(counts: Mapping[str, Any]) -> str:
  lines = [f"parameters: {counts['params']:,}",
           f"forward GMACs per image: {counts['gmacs_per_image']:.2f}", "", "by group:"]
  lines += [f"  {k:<10} {v:10.3f}" for k, v in counts["gmacs_by_group"].items()]
  lines += ["by kind:"] + [f"  {k:<10} {v:10.3f}" for k, v in counts["gmacs_by_kind"].items()]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  counts = count(config.model)
  print(json.dumps(counts, indent=1) if flags.FLAGS.json else format_table(counts))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that other entry points can import this module.
  config_flags.DEFINE_config_file("config", None, "Config file with a `model` section.")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  app.run(main)
