"""Where a result came from: the library versions, the source commit, the host's ``malloc``."""

from __future__ import annotations

import os
import subprocess


def source_commit() -> str | None:
  """The git commit of this package's checkout (``+dirty`` with uncommitted changes), if any."""
  here = os.path.dirname(os.path.abspath(__file__))

  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()

  try:  # an installed copy inside some other checkout is not that checkout's code
    git("ls-files", "--error-unmatch", "__init__.py")  # of this package, in that checkout
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", here)
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def versions() -> dict[str, str]:
  """Versions of the libraries a result depends on, and the package's git commit if known."""
  import importlib.metadata as md

  out = {}
  packages = ("childtune-jax", "jax", "jaxlib", "flax", "optax", "transformers", "orbax-checkpoint")
  for pkg in packages:
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  commit = source_commit()
  if commit:
    out["childtune-jax commit"] = commit
  return out


ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def malloc_library() -> str:
  """The ``malloc`` this process runs on: a preloaded allocator's file name (e.g.
  ``libtcmalloc_minimal.so.4``, which makes CPU training faster: README, "Speed"), else
  ``"default"``; ``"unknown"`` where ``/proc/self/maps`` cannot be read."""
  try:
    with open("/proc/self/maps") as f:
      names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
  except OSError:
    return "unknown"
  found = sorted(n for n in names if any(a in n for a in ALLOCATORS))
  return found[0] if found else "default"
