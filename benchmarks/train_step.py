"""A full Flax train step with accumulation: the memory saved, the time paid.

A ~50M-parameter token-wise residual MLP (Flax NNX, 6 blocks of
Dense(1024->4096)-GELU-Dense(4096->1024), float32) on random token features.
Two ways to train on 8b sequences per gradient step:

  large   one jitted step at batch 8b: forward, backward, AdamW;
  accum   eight jitted micro-steps at batch b: forward, backward,
          optax_accum.chain(accumulate(8), adamw), apply.

Both steps donate params and optimizer state. Reports the median time of a
micro-step (mid and emitting), the time per 8b sequences, and XLA's temp
bytes (activations and workspace) from `compile().memory_analysis()`.

  python benchmarks/train_step.py [--micro-batch 2] [--seq 128] [--rounds 2]
"""

import argparse
import json
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import optax_accum

K = 8
D, H, BLOCKS = 1024, 4096, 6


class Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


class Model(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs) for _ in range(BLOCKS)])
    self.head = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)[..., 0]


def make_step(graphdef, tx):
  def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    return jnp.mean((model(x) - y) ** 2)

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def measure(name, tx, batch, steps_per_window, rounds, args):
  graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  opt_state = tx.init(params)
  key = jax.random.key(1)
  x = jax.random.normal(key, (batch, args.seq, D), jnp.float32)
  y = jax.random.normal(key, (batch, args.seq), jnp.float32)
  t0 = time.perf_counter()
  compiled = make_step(graphdef, tx).lower(params, opt_state, x, y).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  n_params = sum(p.size for p in jax.tree.leaves(params))
  for _ in range(steps_per_window):  # warm-up window
    params, opt_state = compiled(params, opt_state, x, y)
  mid, emit = [], []
  for _ in range(rounds):
    for i in range(steps_per_window):
      t0 = time.perf_counter()
      params, opt_state = compiled(params, opt_state, x, y)
      jax.block_until_ready((params, opt_state))
      (emit if i == steps_per_window - 1 else mid).append(
          time.perf_counter() - t0)
  mid_s = statistics.median(mid) if mid else 0.0
  emit_s = statistics.median(emit)
  return {
      "run": name, "params": n_params, "batch": batch,
      "mid_step_s": mid_s, "emit_step_s": emit_s,
      "per_window_s": (steps_per_window - 1) * mid_s + emit_s,
      "temp_bytes": mem.temp_size_in_bytes,
      "argument_bytes": mem.argument_size_in_bytes,
      "compile_s": compile_s,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--micro-batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  args = parser.parse_args()
  b = args.micro_batch
  rows = [
      measure(f"large: adamw, batch {K * b}", optax.adamw(1e-4), K * b, 1,
              args.rounds * 2, args),
      measure(f"accum: chain(accumulate({K}), adamw), micro-batch {b}",
              optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-4)),
              b, K, args.rounds, args),
  ]
  large, accum = rows
  dev = jax.devices()[0]
  print(f"\n{large['params']:,} params, sequences of {args.seq} tokens; "
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{dev.device_kind} ({dev.platform}), {platform.machine()}, "
        f"{os.cpu_count()} cores; medians\n")
  print("| run | step s (mid) | step s (emitting) | s per 8b sequences "
        "| XLA temp MiB | temp vs large |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['run']} | {r['mid_step_s']:.3f} | {r['emit_step_s']:.3f} "
          f"| {r['per_window_s']:.3f} | {r['temp_bytes'] / 2**20:.1f} "
          f"| {r['temp_bytes'] / large['temp_bytes']:.2f} |")
  print(f"\naccumulation: {accum['temp_bytes'] / large['temp_bytes']:.2f}x "
        f"the temp memory, {accum['per_window_s'] / large['per_window_s']:.2f}x "
        "the time per 8b sequences")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "train_step.json")
  with open(path, "w") as f:
    json.dump({"jax": jax.__version__, "optax": optax.__version__,
               "device": dev.device_kind, "k": K, "seq": args.seq,
               "rows": rows}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
