"""Imports point one way: entry points -> training -> evaluation -> sampling -> diffusion ->
models -> hdit_kernels (data feeds training and evaluation), with no cycles, also through
imports inside functions. `kernels/` depends on jax alone."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent

# A module may import modules of a lower rank, and its own package.
RANKS = {
    "hdit_kernels": 0, "hdit_jax.config": 0, "hdit_jax.cli": 0,
    "hdit_jax.models": 1, "hdit_jax.data": 1,
    "hdit_jax.diffusion": 2, "hdit_jax.flops": 2, "hdit_jax.weights": 2,
    "hdit_jax.convert": 3,
    "hdit_jax.sampling": 4,
    "hdit_jax.evaluation": 5,
    "hdit_jax.training": 6,
    "hdit_jax.main": 7, "hdit_jax.sample": 7, "hdit_jax.evaluate": 7,
    "hdit_jax.prepare_data": 7,
}


def group(module: str) -> str | None:
  parts = module.split(".")
  for n in (2, 1):
    if ".".join(parts[:n]) in RANKS:
      return ".".join(parts[:n])
  return None


def imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):   # every import, also inside functions
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def modules():
  for path in sorted((ROOT / "hdit_jax").rglob("*.py")):
    yield "hdit_jax." + ".".join(path.relative_to(ROOT / "hdit_jax").with_suffix("").parts), path
  for path in sorted((ROOT / "kernels").rglob("*.py")):
    yield "hdit_kernels." + ".".join(path.relative_to(ROOT / "kernels").with_suffix("").parts), path


def test_imports_point_one_way():
  wrong = []
  for name, path in modules():
    own = group(name.removesuffix(".__init__"))
    for target in imports(path):
      other = group(target)
      if other is None or other == own:
        continue
      if RANKS[other] >= RANKS[own]:
        wrong.append(f"{name} imports {target}")
  assert not wrong, "\n".join(sorted(set(wrong)))


def test_kernels_depend_on_jax_alone():
  allowed = {"jax", "numpy", "functools", "math", "typing", "dataclasses", "hdit_kernels"}
  for name, path in modules():
    if name.startswith("hdit_kernels"):
      roots = {t.split(".")[0] for t in imports(path)}
      assert roots <= allowed, f"{name} imports {sorted(roots - allowed)}"


def test_the_rule_catches_a_backward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from hdit_jax.training import trainer\n")
  assert "hdit_jax.training.trainer" in imports(bad)
  assert RANKS[group("hdit_jax.training.trainer")] > RANKS[group("hdit_jax.sampling.batches")]
