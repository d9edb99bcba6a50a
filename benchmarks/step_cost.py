"""What one mini-step costs: optax_accum against optax's own tools.

For each parameter count and inner optimizer, compiles one jitted update step
per system with the optimizer state donated (the step returns `(state,
updates)`, so the donated state buffers alias the new state), then times the
systems interleaved in one process: each round runs one window of k
mini-steps of every system in turn. Reports medians over rounds of the
mid-step time (mini-steps 1..k-1 of a window) and the emitting-step time
(mini-step k), the amortized time per mini-step ((k-1) mid + 1 emit) / k,
compile time, and `compile().memory_analysis()` bytes as multiples of the
param bytes.

Systems:
  floor          acc += g and emit zeros: the least a mini-step can do
  chainable      optax.chain(optax_accum.accumulate(k), inner)
  accumulate     optax_accum.accumulate(k, inner)
  accum_chain    optax_accum.chain(optax_accum.accumulate(k), inner)
  multisteps     optax.MultiSteps(inner, k)
  apply_every    optax.chain(optax.apply_every(k), inner)

  python benchmarks/step_cost.py                 # CPU, the default grid
  python benchmarks/step_cost.py --sizes 1e6 --inners sgd adamw --rounds 3
  python benchmarks/step_cost.py --device gpu    # the same on CUDA
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optax_accum

sys.path.insert(0, os.path.dirname(__file__))
import hlo  # noqa: E402

K = 5

INNERS = {
  "sgd": lambda: optax.sgd(1e-2),
  "adamw": lambda: optax.adamw(1e-3),
  "muon": lambda: optax.contrib.muon(1e-3),
}


def make_params(n, key=0):
  """A dict of a few float32 leaves, about n elements: 4 d^2 + d."""
  d = max(8, int(round((n / 4) ** 0.5)))
  keys = jax.random.split(jax.random.key(key), 4)
  shapes = {"w1": (d, d), "w2": (d, d), "w3": (d, 2 * d), "b": (d,)}
  return {
    name: 0.01 * jax.random.normal(k, shape, jnp.float32)
    for k, (name, shape) in zip(keys, shapes.items())
  }


def floor():
  """acc += g, emit zeros: the cost floor of any mini-step."""

  def init(params):
    return optax.tree.zeros_like(params)

  def update(updates, acc, params=None):
    del params
    return jax.tree.map(jnp.zeros_like, updates), jax.tree.map(
      jnp.add, acc, updates
    )

  return optax.GradientTransformation(init, update)


def systems(inner_name):
  inner = INNERS[inner_name]
  return {
    "floor": floor(),
    "chainable": optax.chain(optax_accum.accumulate(K), inner()),
    "accumulate": optax_accum.accumulate(K, inner()),
    "accum_chain": optax_accum.chain(optax_accum.accumulate(K), inner()),
    "multisteps": optax.MultiSteps(inner(), K).gradient_transformation(),
    "apply_every": optax.chain(optax.apply_every(K), inner()),
  }


def compile_step(tx, state, grads, params, device):
  def step(state, grads, params):
    updates, state = tx.update(grads, state, params)
    return state, updates

  jitted = jax.jit(step, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, grads, params).compile()
  compile_s = time.perf_counter() - t0
  return compiled, compile_s


def bench_one(n, inner_name, rounds, device):
  params = make_params(n)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  rows = {}
  states, compiled = {}, {}
  for name, tx in systems(inner_name).items():
    state = jax.device_put(tx.init(params), device)
    c, compile_s = compile_step(tx, state, grads, params, device)
    mem = c.memory_analysis()
    rows[name] = {
      "params": n,
      "inner": inner_name,
      "system": name,
      "compile_s": compile_s,
      "copies": hlo.full_size_copies(c.as_text(), params),
      **{
        f"{kind}_x": getattr(mem, f"{kind}_size_in_bytes") / param_bytes
        for kind in ("argument", "output", "alias", "temp")
      },
      "mid": [],
      "emit": [],
    }
    states[name], compiled[name] = state, c
    # One warm-up window, not timed.
    for _ in range(K):
      states[name], u = c(states[name], grads, params)
    jax.block_until_ready(states[name])

  for _ in range(rounds):
    for name, c in compiled.items():
      for i in range(K):
        t0 = time.perf_counter()
        states[name], u = c(states[name], grads, params)
        jax.block_until_ready((states[name], u))
        rows[name]["mid" if i < K - 1 else "emit"].append(
          time.perf_counter() - t0
        )
  for row in rows.values():
    row["mid_ms"] = 1e3 * statistics.median(row.pop("mid"))
    row["emit_ms"] = 1e3 * statistics.median(row.pop("emit"))
    row["amortized_ms"] = ((K - 1) * row["mid_ms"] + row["emit_ms"]) / K
  return list(rows.values())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument(
    "--sizes", nargs="+", type=float, default=[1e6, 1e7, 2e7, 5e7]
  )
  parser.add_argument(
    "--inners", nargs="+", default=list(INNERS), choices=list(INNERS)
  )
  parser.add_argument(
    "--muon-max",
    type=float,
    default=2e7,
    help="skip muon above this many params (its "
    "Newton-Schulz iterations run on every MultiSteps "
    "mini-step)",
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  args = parser.parse_args()
  device = jax.devices(args.device)[0]
  jax.config.update("jax_default_device", device)

  results = []
  for n in args.sizes:
    for inner in args.inners:
      if inner == "muon" and n > args.muon_max:
        continue
      rounds = max(2, args.rounds // 2) if inner == "muon" else args.rounds
      results += bench_one(int(n), inner, rounds, device)
      print(f"done: {int(n):,} params, {inner}", flush=True)

  print(
    f"\njax {jax.__version__}, optax {optax.__version__}, "
    f"{device.device_kind} ({device.platform}), {platform.machine()}, "
    f"{os.cpu_count()} cores; k={K}, float32, state donated, medians\n"
  )
  print(
    "| params | inner | system | mid ms | emit ms | amortized ms "
    "| vs floor (mid) | vs MultiSteps (amortized) | compile s "
    "| state copies | arg x | out x | alias x | temp x |"
  )
  print("|" + "---|" * 14)
  for r in results:
    same = [
      q
      for q in results
      if q["params"] == r["params"] and q["inner"] == r["inner"]
    ]
    fl = next(q for q in same if q["system"] == "floor")
    ms = next(q for q in same if q["system"] == "multisteps")
    print(
      f"| {r['params']:,} | {r['inner']} | {r['system']} "
      f"| {r['mid_ms']:.2f} | {r['emit_ms']:.2f} | {r['amortized_ms']:.2f} "
      f"| {r['mid_ms'] / fl['mid_ms']:.2f} "
      f"| {r['amortized_ms'] / ms['amortized_ms']:.2f} "
      f"| {r['compile_s']:.2f} | {r['copies']} | {r['argument_x']:.2f} "
      f"| {r['output_x']:.2f} | {r['alias_x']:.2f} | {r['temp_x']:.2f} |"
    )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"step_cost_{args.device}.json")
  with open(path, "w") as f:
    json.dump(
      {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": device.device_kind,
        "k": K,
        "rows": results,
      },
      f,
      indent=1,
    )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
