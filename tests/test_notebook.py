"""The Colab sampling notebook runs top to bottom on the converted fixture model."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_sampling_notebook_runs(kdiff, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("HDIT_NOTEBOOK_KDIFFUSION", kdiff.path("hdit_weights.safetensors"))
  monkeypatch.setenv("HDIT_NOTEBOOK_STEPS", "3")
  monkeypatch.setenv("HDIT_NOTEBOOK_NUM_IMAGES", "4")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  notebook = nbformat.read(ROOT / "notebooks" / "sample.ipynb", as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = notebook.cells[-1].outputs
  assert any("image/png" in o.get("data", {}) for o in outputs), outputs
  assert any("(4, 64, 64, 3)" in o.get("text", "") for o in outputs), outputs


def _install_cell() -> dict:
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(ROOT / "notebooks" / "sample.ipynb", as_version=4)
  (cell,) = [c for c in notebook.cells if "HDIT_SOURCE" in c.source and c.cell_type == "code"]
  namespace = {}
  exec(compile(cell.source, "install cell", "exec"), namespace)   # hdit_jax is installed here
  return namespace


def test_install_cell_sources():
  install_commands = _install_cell()["install_commands"]
  with pytest.raises(ValueError, match="set HDIT_SOURCE above"):
    install_commands("")
  with pytest.raises(ValueError, match="must be a wheel"):
    install_commands("gs://bucket/src.tar.gz")
  copy, pip = install_commands("gs://bucket/wheels/hdit_jax-0.1.0-py3-none-any.whl")
  assert copy == ["gcloud", "storage", "cp", "gs://bucket/wheels/hdit_jax-0.1.0-py3-none-any.whl",
                  "/tmp/hdit_jax-0.1.0-py3-none-any.whl"]
  assert pip[1:] == ["-m", "pip", "install", "-q", "/tmp/hdit_jax-0.1.0-py3-none-any.whl"]
  (git,) = install_commands("git+https://github.com/o/hdit-jax@v0.1.0")
  assert git[-1] == "hdit-jax @ git+https://github.com/o/hdit-jax@v0.1.0"
  (local,) = install_commands("/src/hdit-jax")
  assert local[-1] == "/src/hdit-jax"


def test_install_cell_without_a_source_says_what_to_set(tmp_path):
  """Run the cell where hdit_jax cannot be imported and HDIT_SOURCE is unset."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(ROOT / "notebooks" / "sample.ipynb", as_version=4)
  (cell,) = [c for c in notebook.cells if "HDIT_SOURCE" in c.source and c.cell_type == "code"]
  script = tmp_path / "cell.py"
  script.write_text("import sys\nsys.modules['hdit_jax'] = None  # as if not installed\n"
                    + cell.source)
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
  assert result.returncode != 0
  assert "ValueError: hdit-jax is not installed in this runtime: set HDIT_SOURCE" in result.stderr
