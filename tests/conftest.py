"""Shared test set-up: the k-diffusion reference fixtures and float32-exact matmuls."""

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# Eight CPU devices for the sharding tests; read when JAX first starts its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Programs compiled again (a resumed run, the CLI runs of one config) come from a cache, one
# per test run: the process that makes it (not the xdist workers, which inherit it) removes it.
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="hdit-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest
from safetensors import numpy as st_numpy

DEFAULT_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "kdiff_hdit"


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


class KDiffFixtures:
  """One fixture folder in the k-diffusion reference format (see its README)."""

  def __init__(self, root: pathlib.Path):
    if not root.is_dir():
      raise FileNotFoundError(f"fixture folder not found: {root} (HDIT_KDIFF_FIXTURES)")
    self.root = root

  def path(self, name: str) -> str:
    return str(self.root / name)

  def json(self, name: str):
    with open(self.root / name) as f:
      return json.load(f)

  def tensors(self, name: str) -> dict[str, np.ndarray]:
    return st_numpy.load_file(self.path(name))


@pytest.fixture(scope="session")
def kdiff() -> KDiffFixtures:
  return KDiffFixtures(pathlib.Path(os.environ.get("HDIT_KDIFF_FIXTURES", DEFAULT_FIXTURES)))


GCS_TEST_BUCKET = "hdit-test"


@contextlib.contextmanager
def _gcs_emulator():
  """A local in-memory GCS emulator holding the bucket GCS_TEST_BUCKET; yields its URL."""
  pytest.importorskip("gcsfs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
       f"--port={port}", f"--default-bucket={GCS_TEST_BUCKET}", "--in-memory", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
      time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
  finally:
    server.terminate()
    server.wait(timeout=30)


def _point_gcs_clients_at(url: str, monkeypatch) -> None:
  import gcsfs  # pylint: disable=import-outside-toplevel
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  # A gcsfs instance (and its listings) from an earlier test would talk of another emulator:
  # fsspec caches instances, and etils caches the one it took.
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)            # gcsfs
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)         # orbax's arrays
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # array_record's reader
  # Without it gcsfs asks a gRPC API that ignores the emulator and times out.
  monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture
def gcs_bucket(monkeypatch):
  """gs://hdit-test on a local in-memory GCS emulator, for gcsfs, tensorstore and array_record
  (google-cloud-cpp) alike; the emulator is stopped after the test."""
  with _gcs_emulator() as url:
    _point_gcs_clients_at(url, monkeypatch)
    yield f"gs://{GCS_TEST_BUCKET}"


@pytest.fixture
def faulty_gcs(monkeypatch):
  """(gs://hdit-test, proxy): the emulator behind a proxy that injects faults on request
  (gcs_faults.FaultyGcsProxy); every GCS client talks to the proxy."""
  from gcs_faults import FaultyGcsProxy  # pylint: disable=import-outside-toplevel
  with _gcs_emulator() as url:
    proxy = FaultyGcsProxy(url)
    _point_gcs_clients_at(proxy.url, monkeypatch)
    try:
      yield f"gs://{GCS_TEST_BUCKET}", proxy
    finally:
      proxy.close()


@pytest.fixture(autouse=True)
def highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield


def rel_l2(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="session")
def digit_classifier_dir(tmp_path_factory) -> pathlib.Path:
  """A folder holding the digit metric's classifier, trained once per test session (workdirs
  that evaluate with the digit metric get a copy instead of training their own)."""
  from hdit_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("digit_classifier")
  digits.load_or_train(str(root))
  return root
