"""``childtune overlap``: how far child networks (mask files) agree, against chance."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from childtune_jax import _tree
from childtune_jax.app import files, maskfile, preflight
from childtune_jax.app.errors import UsageError
from childtune_jax.app.summary import print_matrix
from childtune_jax.masks import is_encoder_layer, jaccard, kept_fraction


def overlap_matrices(masks: list[dict], where: Any) -> dict:
  """Pairwise overlap of child networks, with what their sizes alone would give.

  ``jaccard`` is |A ∩ B| / |A ∪ B|; ``overlap`` is |A ∩ B| / min(|A|, |B|) (1 when the
  smaller network lies inside the larger); ``random_jaccard`` is the Jaccard that
  independent random networks of the same sizes have, ab / (a + b - ab) for kept
  fractions a and b (its limit for large networks). Jaccard alone misleads across sizes:
  a 10% network inside a 30% one has Jaccard 1/3. A ratio of 0/0 (two empty networks; an
  empty one's overlap) is undefined: ``nan``, ``null`` in JSON.
  """
  sizes = [kept_fraction(m, where=where) for m in masks]
  n = len(masks)
  out = {name: np.eye(n) for name in ("jaccard", "overlap", "random_jaccard")}
  for i in range(n):
    for j in range(i, n):
      (ka, total), (kb, _) = sizes[i], sizes[j]
      if i == j:
        jac = 1.0 if ka else math.nan
      else:
        jac = jaccard(masks[i], masks[j], where=where)
      inter = 0.0 if math.isnan(jac) else jac * (ka + kb) / (1 + jac)  # |A u B| = |A|+|B|-|A n B|
      a, b = ka / total, kb / total
      smaller = min(ka, kb)
      for name, value in (("jaccard", jac),
                          ("overlap", inter / smaller if smaller else math.nan),
                          ("random_jaccard", a * b / (a + b - a * b) if a + b else math.nan)):
        out[name][i, j] = out[name][j, i] = value
  return {"kept_fraction": [k / t for k, t in sizes],
          **{name: m.tolist() for name, m in out.items()}}


def add_arguments(p: argparse.ArgumentParser) -> None:
  """``childtune overlap``'s options."""
  p.add_argument("masks", nargs="+", help="child_mask.npz files written by train")
  p.add_argument("--names", nargs="+", help="a label per mask (default: its folder)")
  p.add_argument("--all-leaves", action="store_true",
                 help="count every leaf, not only the encoder layers D selects from")
  p.add_argument("--json", help="write the matrix here")
  p.add_argument("--plot", help="write a heatmap PNG here (needs matplotlib)")


def run(args: argparse.Namespace) -> dict:
  """Prints (and writes, and plots) the overlap matrices of ``args.masks``."""
  names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(m))) or m
                         for m in args.masks]
  if len(names) != len(args.masks):
    raise UsageError(f"--names has {len(names)} labels for {len(args.masks)} masks")
  if args.plot and importlib.util.find_spec("matplotlib") is None:
    raise UsageError("--plot needs matplotlib: pip install matplotlib")
  if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".svg", ".pdf",
                                                                  ".jpg", ".jpeg"):
    raise UsageError(f"--plot {args.plot}: use a .png, .svg, .pdf or .jpg file name")
  for option, path in (("--json", args.json), ("--plot", args.plot)):
    if path:
      preflight.writable_file(path, option)
  masks = [{k: jnp.asarray(v) for k, v in maskfile.read(m)[0].items()} for m in args.masks]
  for out in (args.json, args.plot):
    if out:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  where = None if args.all_leaves else is_encoder_layer
  for i in range(1, len(masks)):
    try:
      _tree.check_structure(args.masks[i], masks[i], masks[0], reference_name=args.masks[0])
    except ValueError as e:
      raise UsageError(str(e)) from None
  result = {"names": names, "masks": args.masks, **overlap_matrices(masks, where)}
  for name, fraction in zip(names, result["kept_fraction"]):
    print(f"{name}: {100 * fraction:.2f}% of the scalars kept")
  print_matrix("Jaccard |A n B| / |A u B|", names, result["jaccard"])
  print_matrix("overlap |A n B| / min(|A|, |B|)", names, result["overlap"])
  print_matrix("Jaccard of random masks of the same sizes", names, result["random_jaccard"])
  if args.json:
    files.write_json(args.json, result)
  if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.9 * n + 2), 0.9 * n + 1.5))
    for ax, key, label in ((axes[0], "jaccard", "Jaccard |A∩B| / |A∪B|"),
                           (axes[1], "overlap", "overlap |A∩B| / min(|A|, |B|)")):
      matrix = np.asarray(result[key])
      im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
      ax.set_xticks(range(n), names, rotation=45, ha="right")
      ax.set_yticks(range(n), names)
      for i in range(n):
        for j in range(n):
          undefined = math.isnan(matrix[i, j])
          ax.text(j, i, "n/a" if undefined else f"{matrix[i, j]:.2f}", ha="center",
                  va="center", fontsize=8,
                  color="black" if undefined or matrix[i, j] >= 0.6 else "white")
      fig.colorbar(im, ax=ax, fraction=0.046)
      ax.set_title(label)
    fig.suptitle("Overlap of Child-Tuning_D child networks")
    fig.tight_layout()
    try:
      files.save_figure(fig, args.plot, dpi=120)
    finally:
      plt.close(fig)
  return result
