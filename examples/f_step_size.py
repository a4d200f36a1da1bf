"""How far Adam moves a parameter under Child-Tuning_F, against unmasked gradients.

F keeps each gradient with probability p and scales it by 1/p, so the first moment keeps
its mean g while the second grows to g^2/p: Adam's step m/sqrt(v) shrinks to about sqrt(p)
of the unmasked one. This simulates the study's 189 steps (constant gradient, optax's
defaults b1 0.9, b2 0.999, the reference's eps 1e-6) with the real masks of
``child_tuning_f`` and prints the mean distance moved relative to unmasked Adam.

  python examples/f_step_size.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from childtune_jax import child_tuning_f


def relative_distance(reserve_p: float, steps: int, n: int, seed: int = 0) -> float:
  """Mean distance moved by chain(F, adam) over ``n`` parameters, over that of adam."""

  def distance(tx: optax.GradientTransformation) -> jax.Array:
    params = jnp.zeros(n)
    state = tx.init(params)

    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jnp.ones(n), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, state), length=steps)
    return -jnp.mean(params)

  adam = optax.adam(1.0, eps=1e-6)
  masked = optax.chain(child_tuning_f(reserve_p, key=seed), adam)
  return float(distance(masked) / distance(adam))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=189)
  parser.add_argument("--n", type=int, default=100_000, help="parameters averaged over")
  parser.add_argument("--p", type=float, nargs="+", default=[0.2, 0.3, 0.4])
  args = parser.parse_args()
  print("| p | F's distance / Adam's | sqrt(p) |\n|---|---|---|")
  for p in args.p:
    print(f"| {p} | {relative_distance(p, args.steps, args.n):.3f} | {p ** 0.5:.3f} |")


if __name__ == "__main__":
  main()
