"""Shared command-line plumbing of the experiment scripts: one-line errors for bad flags."""

import os
import sys

from absl import flags


def die(message: str) -> None:
  """Prints ``<script>: error: <message>`` to stderr and exits with status 2."""
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser that reports a bad flag in one line (instead of the usage text).

  Use as ``app.run(main, flags_parser=cli.parse_flags)``.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    die(str(e))
