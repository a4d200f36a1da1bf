"""The MiniLM train step over 1, 2, 4 and 8 devices, and bfloat16 against float32.

Each device count runs in its own process (JAX fixes the count when it starts; on a CPU
the devices are emulated with ``--xla_force_host_platform_device_count``), with the
CLI's own sharding: ``parallel.make_mesh``, ``shardings_by_shape`` for parameters and
optimizer state, ``put_batch`` for the batch. Emulated devices share the machine's cores,
so on a CPU this is a check that scaling is *correct* (the same losses on every mesh,
to float tolerance) and costs little, not a speedup. Each case is appended to ``--out``
as it finishes.

  python benchmarks/bench_devices.py --out benchmarks/results/devices.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = "--child"


def child(devices: int, mesh_spec: str, dtype_name: str, batch: int, seq: int,
          reps: int) -> None:
  """Times vanilla and Child-Tuning_F steps on this process's mesh; prints JSON lines."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from childtune_jax import child_tuning_adamw, parallel
  from childtune_jax.models import EncoderConfig, SequenceClassifier

  assert jax.device_count() == devices, jax.devices()
  cfg = EncoderConfig("bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522)  # all-MiniLM-L6-v2's shape
  graphdef, state = nnx.split(SequenceClassifier(cfg, rngs=nnx.Rngs(0),
                                                 dtype=jnp.dtype(dtype_name)))
  host_params = jax.device_get(nnx.to_pure_dict(state))
  mesh = parallel.make_mesh(parallel.parse_mesh(mesh_spec, devices))
  rng = np.random.default_rng(0)
  batches = [{"input_ids": rng.integers(5, cfg.vocab_size, (batch, seq)).astype(np.int32),
              "attention_mask": np.ones((batch, seq), np.int32),
              "token_type_ids": np.zeros((batch, seq), np.int32),
              "labels": rng.integers(0, 2, batch).astype(np.int32)} for _ in range(reps + 1)]
  batches = [parallel.put_batch(b, parallel.batch_sharding(mesh)) for b in batches]

  def loss_fn(p, b):  # no dropout: the same function on every mesh
    logits = nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), b["labels"]).mean()

  modes = {"vanilla": optax.adamw(1e-4, eps=1e-6, weight_decay=0.01),
           "F": child_tuning_adamw(1e-4, mode="F", reserve_p=0.3, key=0, eps=1e-6,
                                   weight_decay=0.01)}
  steps, state = {}, {}
  for mode, tx in modes.items():
    p_shard = parallel.shardings_by_shape(mesh, host_params)
    s_shard = parallel.shardings_by_shape(mesh, jax.eval_shape(tx.init, host_params))
    params = jax.device_put(host_params, p_shard)

    def step(p, s, b, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    steps[mode] = jax.jit(step, donate_argnums=(0, 1),
                          out_shardings=(p_shard, s_shard, parallel.replicated(mesh)))
    state[mode] = (params, jax.jit(tx.init, out_shardings=s_shard)(params))
  compile_s, times, losses = {}, {m: [] for m in modes}, {m: [] for m in modes}
  for i, b in enumerate(batches):  # the modes interleaved, step by step: the same noise
    for mode, fn in steps.items():
      t = time.perf_counter()
      params, opt_state, loss = fn(*state[mode], b)
      loss.block_until_ready()
      if i == 0:
        compile_s[mode] = time.perf_counter() - t
      else:
        times[mode].append(time.perf_counter() - t)
      state[mode] = (params, opt_state)
      losses[mode].append(float(loss))
  for mode in modes:
    ms = 1000 * float(np.median(times[mode]))
    print(json.dumps({"devices": devices, "mesh": mesh_spec, "dtype": dtype_name, "mode": mode,
                      "batch": batch, "seq": seq, "ms": ms, "examples_per_s": batch / ms * 1000,
                      "compile_s": compile_s[mode], "losses": losses[mode],
                      "device_kind": jax.devices()[0].device_kind}), flush=True)


CASES = [(1, "data=1", "float32"), (1, "data=1", "bfloat16"), (2, "data=2", "float32"),
         (4, "data=4", "float32"), (8, "data=8", "float32"), (8, "data=4,fsdp=2", "float32")]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="a .jsonl file, one line per case")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args(argv)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  rows = []
  with open(args.out, "w") as out:
    for devices, mesh, dtype in CASES:
      env = dict(os.environ, JAX_PLATFORMS="cpu",  # emulated devices, even beside a GPU
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
      proc = subprocess.run(
          [sys.executable, __file__, CHILD, str(devices), mesh, dtype, str(args.batch),
           str(args.seq), str(args.reps)], env=env, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"{devices} devices ({mesh}) failed:\n{proc.stderr[-3000:]}")
      for line in proc.stdout.splitlines():
        row = json.loads(line)
        rows.append(row)
        out.write(line + "\n")
        out.flush()
        print(f"{row['devices']} devices {row['mesh']:<14} {row['dtype']:<8} {row['mode']:<7} "
              f"{row['ms']:8.1f} ms  {row['examples_per_s']:7.1f} ex/s", flush=True)
  print(table(rows))


def table(rows: list[dict]) -> str:
  """A markdown table: time per step, examples/s, ratios, and the losses against 1 device."""
  ref = {r["mode"]: r for r in rows if r["devices"] == 1 and r["dtype"] == "float32"}
  lines = ["| devices | mesh | dtype | mode | ms/step | examples/s | vs 1 device float32 "
           "| F / vanilla | max rel. loss diff vs 1 device |",
           "|---|---|---|---|---|---|---|---|---|"]
  by_case = {(r["mesh"], r["dtype"], r["mode"]): r for r in rows}
  for r in rows:
    base = ref[r["mode"]]
    vanilla = by_case[(r["mesh"], r["dtype"], "vanilla")]
    diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
    lines.append(f"| {r['devices']} | {r['mesh']} | {r['dtype']} | {r['mode']} | "
                 f"{r['ms']:.1f} | {r['examples_per_s']:.1f} | {r['ms'] / base['ms']:.2f}x | "
                 f"{r['ms'] / vanilla['ms']:.2f}x | {diff:.1e} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == CHILD:
    d, m, dt, b, s, n = sys.argv[2:8]
    child(int(d), m, dt, int(b), int(s), int(n))
  else:
    main()
