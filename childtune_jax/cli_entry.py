"""The ``childtune`` command's entry point: a one-line error where its extra is missing.

The library (``pip install childtune-jax``) needs jax, flax, optax, numpy and safetensors;
the command line also transformers (tokenizers), datasets, orbax-checkpoint, scikit-learn,
scipy and tqdm, which ``pip install 'childtune-jax[cli]'`` brings.
"""

from __future__ import annotations

import importlib.util
import sys

CLI_MODULES = {"transformers": "transformers", "datasets": "datasets",
               "orbax": "orbax-checkpoint", "sklearn": "scikit-learn", "scipy": "scipy",
               "tqdm": "tqdm", "tokenizers": "tokenizers", "jinja2": "jinja2"}


def missing() -> list[str]:
  """The packages of the ``cli`` extra that are not installed."""
  return [package for module, package in CLI_MODULES.items()
          if importlib.util.find_spec(module) is None]


def main() -> None:
  absent = missing()
  if absent:
    print("childtune: error: the command line needs its extra: pip install "
          f"'childtune-jax[cli]' (missing: {', '.join(absent)})", file=sys.stderr)
    sys.exit(2)
  from childtune_jax.app.cli import console_main

  console_main()
