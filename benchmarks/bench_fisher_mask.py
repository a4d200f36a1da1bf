r"""``fisher_mask`` on 1e9 scalars (eight leaves of 125M float32): time and peak memory.

Peak memory is the process's peak resident size during ``fisher_mask`` alone (reset after
the scores are made), beside the size of the Fisher arrays (3.7 GB) and of the mask that it
returns (0.9 GB as bools, 0.12 GB bit-packed with ``--packing uint8``).

  python benchmarks/bench_fisher_mask.py --json benchmarks/results/fisher_mask.json
  python benchmarks/bench_fisher_mask.py --packing uint8 \
      --json benchmarks/results/fisher_mask_packed.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import time

import jax
import numpy as np

from childtune_jax import fisher_mask, kept_fraction


def rss_gb(field: str = "VmHWM") -> float:
  """Peak (``VmHWM``) or current (``VmRSS``) resident size of this process, in GiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 2**20  # kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak() -> None:
  """Resets the peak resident size, so that it measures what follows (Linux)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, default=8)
  parser.add_argument("--leaf-size", type=int, default=125_000_000)
  parser.add_argument("--reserve-p", type=float, default=0.3)
  parser.add_argument("--packing", choices=["uint8", "uint32"], help="return packed words")
  parser.add_argument("--json")
  args = parser.parse_args()
  base = rss_gb()
  fisher = {f"layer_{i}": jax.random.exponential(jax.random.key(i), (args.leaf_size,))
            for i in range(args.leaves)}
  jax.block_until_ready(fisher)
  # Hand the RNG's freed temporaries back to the OS, so that the resident size before
  # fisher_mask is the scores alone (else fisher_mask reuses them unseen).
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  reset_peak()
  with_fisher = rss_gb("VmRSS")
  t = time.perf_counter()
  keep = fisher_mask(fisher, args.reserve_p, packing=args.packing)
  jax.block_until_ready(keep)
  seconds = time.perf_counter() - t
  peak = rss_gb()
  if args.packing:
    kept = sum(int(np.unpackbits(np.asarray(x).view(np.uint8)).sum()) for x in keep.values())
    total = sum(x.size for x in fisher.values())
  else:
    kept, total = kept_fraction(keep)
  fisher_gb = sum(x.nbytes for x in fisher.values()) / 2**30
  mask_gb = sum(x.nbytes for x in keep.values()) / 2**30
  result = {
      "scalars": total, "packing": args.packing or "bool", "seconds": seconds,
      "kept_fraction": kept / total,
      "fisher_gb": fisher_gb, "mask_gb": mask_gb, "rss_before_gb": base,
      "rss_with_fisher_gb": with_fisher, "peak_rss_gb": peak,
      "peak_over_fisher": (peak - base) / fisher_gb,
      "peak_over_fisher_and_mask": (peak - base) / (fisher_gb + mask_gb),
      "extra_gb_beyond_fisher_and_mask": peak - with_fisher - mask_gb,
      "cpus": os.cpu_count(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }
  assert np.isclose(kept / total, args.reserve_p, atol=1e-3)
  for k, v in result.items():
    print(f"{k:34s} {v:.3f}" if isinstance(v, float) else f"{k:34s} {v}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
