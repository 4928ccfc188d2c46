"""What the command lines share: a user error ends a command in one line, `error: ...`, exit 2.

It depends on absl alone, so every entry point can use it (tests/test_layering.py ranks it with
the config, below everything else).
"""

import os
import sys
from typing import NoReturn

from absl import flags

USAGE_STATUS = 2   # bad input; 1 is left to a run that cannot go on


def exit_with_error(message: str, status: int = USAGE_STATUS) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with an unknown flag or a
  value a flag cannot take reported in one line with exit status 2; absl's own report is a
  `FATAL Flags parsing error` with exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_with_error(f"{e} (--helpfull lists the flags)")


def existing_ancestor(path: str) -> str:
  """The path itself or its nearest ancestor that exists: a directory to be made under it can
  be made only if this is a directory."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing
