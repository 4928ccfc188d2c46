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
