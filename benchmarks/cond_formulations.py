"""How the state enters the conditional decides whether XLA copies it.

The record behind `accumulate`'s formulation (issue 3): five ways to write
one mini-step of "acc += g; every k-th step run Adam on acc / k and reset",
each jitted with the state donated, on 20M float32 parameters. Reports the
median mid-step and emitting-step times and the number of full-size `copy`
ops in the compiled step.

  floor       acc += g; emit zeros (no conditional, no Adam)
  select      Adam computed every step, kept with jnp.where (MultiSteps)
  inside      acc += g inside both branches of lax.cond; emit branch zeroes
  outside     acc += g before the cond; emit branch returns zeroed acc
  reset_after acc += g before the cond; jnp.where(emit, 0, acc) after it
  lazy        acc = where(window_start, g, acc + g) before the cond; the
              cond neither reads back nor returns acc on mid-steps
              (what optax_accum does)

  python benchmarks/cond_formulations.py [--n 2e7]
"""

import argparse
import os
import platform
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
import hlo  # noqa: E402

K = 5


def adam(g, mu, nu):
  mu = 0.9 * mu + 0.1 * g
  nu = 0.999 * nu + 0.001 * g * g
  return -1e-3 * mu / (jnp.sqrt(nu) + 1e-8), mu, nu


def floor(s, g):
  acc, mu, nu, i = s
  return (acc + g, mu, nu, i + 1), jnp.zeros_like(g)


def select(s, g):
  acc, mu, nu, i = s
  emit = i % K == K - 1
  acc = acc + g
  u, mu2, nu2 = adam(acc / K, mu, nu)
  return (
    (
      jnp.where(emit, 0.0, acc),
      jnp.where(emit, mu2, mu),
      jnp.where(emit, nu2, nu),
      i + 1,
    ),
    jnp.where(emit, u, 0.0),
  )


def inside(s, g):
  acc, mu, nu, i = s

  def e(acc, mu, nu, g):
    u, mu, nu = adam((acc + g) / K, mu, nu)
    return u, jnp.zeros_like(acc), mu, nu

  def m(acc, mu, nu, g):
    return jnp.zeros_like(g), acc + g, mu, nu

  u, acc, mu, nu = lax.cond(i % K == K - 1, e, m, acc, mu, nu, g)
  return (acc, mu, nu, i + 1), u


def outside(s, g):
  acc, mu, nu, i = s
  acc = acc + g

  def e(acc, mu, nu):
    u, mu, nu = adam(acc / K, mu, nu)
    return u, jnp.zeros_like(acc), mu, nu

  def m(acc, mu, nu):
    return jnp.zeros_like(acc), acc, mu, nu

  u, acc, mu, nu = lax.cond(i % K == K - 1, e, m, acc, mu, nu)
  return (acc, mu, nu, i + 1), u


def reset_after(s, g):
  acc, mu, nu, i = s
  emit = i % K == K - 1
  acc = acc + g

  def e(acc, mu, nu):
    return adam(acc / K, mu, nu)

  def m(acc, mu, nu):
    return jnp.zeros_like(acc), mu, nu

  u, mu, nu = lax.cond(emit, e, m, acc, mu, nu)
  return (jnp.where(emit, 0.0, acc), mu, nu, i + 1), u


def lazy(s, g):
  acc, mu, nu, i = s
  acc = jnp.where(i % K == 0, g, acc + g)

  def e(acc, mu, nu):
    return adam(acc / K, mu, nu)

  def m(acc, mu, nu):
    return jnp.zeros_like(acc), mu, nu

  u, mu, nu = lax.cond(i % K == K - 1, e, m, acc, mu, nu)
  return (acc, mu, nu, i + 1), u


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=float, default=2e7)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  n = int(args.n)
  g = jnp.full((n,), 1e-3, jnp.float32)
  fns = [floor, select, inside, outside, reset_after, lazy]
  compiled, states, times = {}, {}, {}
  for f in fns:
    state = (jnp.zeros(n), jnp.zeros(n), jnp.zeros(n), jnp.zeros([], jnp.int32))
    c = jax.jit(f, donate_argnums=0).lower(state, g).compile()
    copies = hlo.full_size_copies(c.as_text(), g)
    compiled[f.__name__], states[f.__name__] = (c, copies), state
    times[f.__name__] = ([], [])
  for _ in range(args.rounds + 1):
    for name, (c, _) in compiled.items():
      for i in range(K):
        t0 = time.perf_counter()
        states[name], u = c(states[name], g)
        jax.block_until_ready((states[name], u))
        times[name][i == K - 1].append(time.perf_counter() - t0)
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, "
    f"{jax.devices()[0].platform}, {platform.machine()}, "
    f"{os.cpu_count()} cores; {n:,} float32 params, k={K}, medians "
    "(first window dropped)\n"
  )
  print("| formulation | mid ms | emit ms | mid vs floor | full-size copies |")
  print("|---|---|---|---|---|")
  base = statistics.median(times["floor"][0][K - 1 :])
  for name, (_, copies) in compiled.items():
    mid = statistics.median(times[name][0][K - 1 :])
    emit = statistics.median(times[name][1][1:])
    print(
      f"| {name} | {1e3 * mid:.1f} | {1e3 * emit:.1f} | {mid / base:.2f} "
      f"| {copies} |"
    )


if __name__ == "__main__":
  main()
