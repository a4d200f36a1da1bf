r"""Where a D child network lies: its kept fraction per kind of parameter and per layer.

Reads ``child_mask.npz`` files written by ``childtune train --mode D`` and prints (and
writes, with ``--out``) a markdown table: one row per kind of encoder-layer parameter
(the layer index folded, e.g. ``attention/self/query/kernel``), one column per mask, then
one row per encoder layer.

  R=results/low-resource
  python examples/mask_anatomy.py $R/{rte,mrpc,cola,sst2}/D/seed-42/child_mask.npz \
      --names RTE MRPC CoLA SST-2 --out $R/overlap/anatomy_seed42.md
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from childtune_jax.app import files

LAYER = re.compile(r"(?:^|/)layer/(\d+)/")


def anatomy(path: str) -> tuple[dict[str, tuple[int, int]], dict[int, tuple[int, int]]]:
  """``(kept, total)`` per parameter kind and per encoder layer of one mask file."""
  kinds: dict[str, list[int]] = {}
  layers: dict[int, list[int]] = {}
  with np.load(path) as masks:
    for name in masks.files:
      match = LAYER.search(name)
      if not match:
        continue
      keep = masks[name]
      kind = name[match.end():]
      for key, table in ((kind, kinds), (int(match.group(1)), layers)):
        counts = table.setdefault(key, [0, 0])
        counts[0] += int(keep.sum())
        counts[1] += keep.size
  return ({k: tuple(v) for k, v in kinds.items()}, {k: tuple(v) for k, v in layers.items()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("masks", nargs="+", help="child_mask.npz files")
  parser.add_argument("--names", nargs="+", help="a label per mask")
  parser.add_argument("--out", help="write the markdown table here")
  args = parser.parse_args()
  names = args.names or args.masks
  if len(names) != len(args.masks):
    parser.error(f"--names has {len(names)} labels for {len(args.masks)} masks")
  results = [anatomy(m) for m in args.masks]
  kinds = sorted(results[0][0], key=lambda k: -np.mean(
      [r[0][k][0] / r[0][k][1] for r in results if k in r[0]]))
  header = "| parameter (every layer) | scalars | " + " | ".join(names) + " |"
  lines = [header, "|---|---:|" + "---:|" * len(names)]
  for kind in kinds:
    cells = [f"{100 * r[0][kind][0] / r[0][kind][1]:.1f}%" for r in results]
    lines.append(f"| `{kind}` | {results[0][0][kind][1]:,} | " + " | ".join(cells) + " |")
  for layer in sorted(results[0][1]):
    cells = [f"{100 * r[1][layer][0] / r[1][layer][1]:.1f}%" for r in results]
    lines.append(f"| layer {layer} (all its parameters) | {results[0][1][layer][1]:,} | "
                 + " | ".join(cells) + " |")
  kept = [sum(k for k, _ in r[0].values()) / sum(t for _, t in r[0].values()) for r in results]
  lines.append("| **all encoder layers** | "
               f"{sum(t for _, t in results[0][0].values()):,} | "
               + " | ".join(f"**{100 * k:.1f}%**" for k in kept) + " |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    files.write_text(args.out, text)


if __name__ == "__main__":
  main()
