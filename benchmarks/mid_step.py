"""What a mini-step costs at the user's boundary: update, apply, donation.

Every system is one jitted step `(params, opt_state, grads) -> (params,
opt_state)` with params and optimizer state donated, as a real train step
(minus forward and backward, which are the same for all). Timed interleaved
in one process, one window of k mini-steps of each system per round;
medians over rounds of the mid-steps and of the emitting step.

Systems (AdamW, k=5, float32):
  floor        acc += g, params untouched: the least a mid-step can do
  bare_adamw   adamw update + apply every step (no accumulation)
  fused        optax_accum.apply_gradients(chain(accumulate(k), adamw), ...)
  fused_noise  the same with track_noise_scale=True (gradient_noise_scale)
  two_lines    tx.update + optax.apply_updates with the same tx
  multisteps   optax.MultiSteps(adamw, k) update + apply

Then the same inside one jitted `lax.scan` over a window of k micro-batch
gradients (the scan of `acc += g` against the scan of `apply_gradients`),
and under `jax.vmap` over an ensemble of 4 members (the vmapped `acc += g`
against the vmapped `apply_gradients`, with every counter batched and with
`optax_accum.share_counters`).

  python benchmarks/mid_step.py [--sizes 2e7 5e7] [--rounds 7] [--device gpu]
"""

import argparse
import json
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
import hlo  # pylint: disable=g-import-not-at-top,wrong-import-position
from step_cost import make_params  # noqa: E402

import optax_accum  # pylint: disable=g-import-not-at-top,wrong-import-position

K = 5


def floor_step(params, acc, grads):
  return params, jax.tree.map(jnp.add, acc, grads)


def systems():
  adamw = lambda: optax.adamw(1e-3)
  exact = optax_accum.chain(optax_accum.accumulate(K), adamw())
  multisteps = optax.MultiSteps(adamw(), K).gradient_transformation()

  def two_lines(tx):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  tracked = optax_accum.accumulate(K, adamw(), track_noise_scale=True)

  def fused(params, state, grads):
    return optax_accum.apply_gradients(exact, grads, state, params)

  def fused_noise(params, state, grads):
    return optax_accum.apply_gradients(tracked, grads, state, params)

  return {
    "floor": (floor_step, optax.tree.zeros_like),
    "bare_adamw": (two_lines(adamw()), adamw().init),
    "fused": (fused, exact.init),
    "fused_noise": (fused_noise, tracked.init),
    "two_lines": (two_lines(exact), exact.init),
    "multisteps": (two_lines(multisteps), multisteps.init),
  }


def scan_systems():
  exact = optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-3))

  def floor_scan(params, acc, grads_k):
    def body(carry, g):
      p, a = carry
      return floor_step(p, a, g), None

    return lax.scan(body, (params, acc), grads_k)[0]

  def fused_scan(params, state, grads_k):
    def body(carry, g):
      p, s = carry
      return optax_accum.apply_gradients(exact, g, s, p), None

    return lax.scan(body, (params, state), grads_k)[0]

  return {
    "floor_scan": (floor_scan, optax.tree.zeros_like),
    "fused_scan": (fused_scan, exact.init),
  }


def vmap_systems(members):
  """An ensemble: every system vmapped over a leading member axis."""
  exact = optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-3))

  def fused(params, state, grads):
    return optax_accum.apply_gradients(exact, grads, state, params)

  def shared_init(members):
    return optax_accum.share_counters(jax.vmap(exact.init)(members))[0]

  _, axes = optax_accum.share_counters(jax.vmap(exact.init)(members))
  shared = jax.vmap(fused, in_axes=(0, axes, 0), out_axes=(0, axes))
  return {
    "floor_vmap": (jax.vmap(floor_step), jax.vmap(optax.tree.zeros_like)),
    "fused_vmap": (jax.vmap(fused), jax.vmap(exact.init)),
    "shared_vmap": (shared, shared_init),
  }


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def bench(systems_, params, grads, rounds, window):
  """Compiles every system, then times them interleaved."""
  rows, live = {}, {}
  for name, (step, init) in systems_.items():
    jitted = jax.jit(step, donate_argnums=(0, 1))
    p, s = _copy(params), init(params)
    t0 = time.perf_counter()
    compiled = jitted.lower(p, s, grads).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rows[name] = {
      "system": name,
      "compile_s": compile_s,
      "copies": hlo.full_size_copies(compiled.as_text(), params),
      "temp_mib": mem.temp_size_in_bytes / 2**20,
      "mid": [],
      "emit": [],
    }
    for _ in range(window):  # warm-up window
      p, s = compiled(p, s, grads)
    jax.block_until_ready((p, s))
    live[name] = [compiled, p, s]
  for _ in range(rounds):
    for name, entry in live.items():
      compiled, p, s = entry
      for i in range(window):
        t0 = time.perf_counter()
        p, s = compiled(p, s, grads)
        jax.block_until_ready((p, s))
        is_mid = window == 1 or i < window - 1
        rows[name]["mid" if is_mid else "emit"].append(time.perf_counter() - t0)
      entry[1:] = [p, s]
  for row in rows.values():
    row["mid_ms"] = 1e3 * statistics.median(row.pop("mid"))
    emit = row.pop("emit")
    row["emit_ms"] = 1e3 * statistics.median(emit) if emit else None
  return list(rows.values())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--sizes", nargs="+", type=float, default=[2e7, 5e7])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument(
    "--parts",
    nargs="+",
    default=["step", "scan", "vmap"],
    choices=["step", "scan", "vmap"],
  )
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  args = parser.parse_args()
  device = jax.devices(args.device)[0]
  jax.config.update("jax_default_device", device)

  results = []
  for n in args.sizes:
    params = make_params(int(n))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    if "step" in args.parts:
      for row in bench(systems(), params, grads, args.rounds, K):
        results.append({"params": int(n), **row})
    grads_k = jax.tree.map(lambda g: jnp.stack([g] * K), grads)
    if "scan" in args.parts:
      for row in bench(scan_systems(), params, grads_k, args.rounds, 1):
        results.append({"params": int(n), **row})
    # An ensemble of 4 members of n/4 params each.
    members = jax.tree.map(
      lambda p: jnp.stack([p] * 4), make_params(int(n) // 4)
    )
    member_grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), members)
    if "vmap" in args.parts:
      for row in bench(
        vmap_systems(members), members, member_grads, args.rounds, K
      ):
        results.append({"params": int(n), **row})
    print(f"done: {int(n):,} params", flush=True)

  print(
    f"\njax {jax.__version__}, optax {optax.__version__}, "
    f"{device.device_kind} ({device.platform}), {platform.machine()}, "
    f"{os.cpu_count()} cores; AdamW, k={K}, float32, params and state "
    "donated, medians\n"
  )
  print(
    "| params | system | mid ms | emit ms | mid vs floor "
    "| emit vs bare adamw | full-size copies | temp MiB | compile s |"
  )
  print("|" + "---|" * 9)
  for r in results:
    same = {q["system"]: q for q in results if q["params"] == r["params"]}
    if r["system"].endswith("_scan"):
      vs_floor = r["mid_ms"] / same["floor_scan"]["mid_ms"]
      emit, vs_bare = "", ""
    elif r["system"].endswith("_vmap"):
      vs_floor = r["mid_ms"] / same["floor_vmap"]["mid_ms"]
      emit, vs_bare = f"{r['emit_ms']:.2f}", ""
    else:
      vs_floor = r["mid_ms"] / same["floor"]["mid_ms"]
      emit = f"{r['emit_ms']:.2f}"
      vs_bare = f"{r['emit_ms'] / same['bare_adamw']['emit_ms']:.2f}"
    print(
      f"| {r['params']:,} | {r['system']} | {r['mid_ms']:.2f} | {emit} "
      f"| {vs_floor:.2f} | {vs_bare} | {r['copies']} "
      f"| {r['temp_mib']:.1f} | {r['compile_s']:.2f} |"
    )
  print(
    "\n(scan rows: ms per window of k micro-batches in one call, vs the "
    "scan of acc += g; vmap rows: 4 members of params/4 each, vmapped, vs "
    "the vmapped acc += g)"
  )
  os.makedirs(args.out, exist_ok=True)
  suffix = "" if len(args.parts) == 3 else "_" + "_".join(args.parts)
  path = os.path.join(args.out, f"mid_step_{args.device}{suffix}.json")
  with open(path, "w") as f:
    json.dump(
      {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": device.device_kind,
        "rows": results,
      },
      f,
      indent=1,
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
