"""The parity tests read everything from the fixture folder: they pass on another config's set."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def test_parity_suite_on_another_config(tmp_path):
  env = dict(os.environ, JAX_ENABLE_X64="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run([sys.executable, str(HERE / "make_fixture_variant.py"), str(tmp_path)],
                 check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
  env = dict(os.environ, HDIT_KDIFF_FIXTURES=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_ENABLE_X64", None)
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-m", "parity", "-p", "no:cacheprovider",
       "tests/models/test_hdit_parity.py", "tests/diffusion/test_losses.py",
       "tests/test_convert.py"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:]
  assert " passed" in result.stdout and "failed" not in result.stdout
