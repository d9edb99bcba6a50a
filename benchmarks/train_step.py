"""The whole train step: accumulation against the large batch and the peers.

A decoder-only transformer (Flax NNX; d=512, 8 layers, 8 heads, MLP 2048,
vocabulary 8192, ~29M params, float32) on a global batch of 8 sequences of
64 tokens, next-token cross-entropy, AdamW. Every system trains on the same
global batch per gradient step; every jitted step donates params and
optimizer state and returns `(params, opt_state)`.

  large        one step at batch 8
  cross_floor_k  k steps at batch 8/k of grads + `acc += g` only (params
               untouched, no optimizer): the floor of any cross-step form
  cond_floor_k the same, with AdamW on the mean on the k-th step inside one
               `lax.cond` (hand-written, the sum restarted by a select):
               the floor of a cross-step form that steps the optimizer
               once per window
  fused_k      k steps at batch 8/k through optax_accum.apply_gradients with
               optax_accum.chain(accumulate(k), adamw) (cross-step)
  in_step_k    one step: optax_accum.microbatched_value_and_grad over k
               micro-batches (lax.scan), then adamw
  scan_k       one step: a hand-written lax.scan summing the k micro-batch
               gradients, then adamw (what MaxText does)
  multisteps_k k steps through optax.MultiSteps(adamw, k) + apply

The systems are timed interleaved in one process (one global batch each per
round); medians over rounds of the time per global batch. XLA temp memory
from `compile().memory_analysis()`; peak RSS (VmHWM) from a separate
process per system (`--rss`), since a process's peak covers everything it
ran.

  python benchmarks/train_step.py [--ks 4 8] [--rounds 3] [--rss]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import optax

import optax_accum

D, LAYERS, HEADS, MLP, VOCAB = 512, 8, 8, 2048, 8192
BATCH, SEQ = 8, 64


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, MLP, rngs=rngs)
    self.down = nnx.Linear(MLP, D, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D)))
    self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.embed.attend(self.norm(x))


def make_data(key=1):
  return jax.random.randint(jax.random.key(key), (BATCH, SEQ + 1), 0, VOCAB)


def loss_and_tokens(graphdef, params, tokens):
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits, tokens[:, 1:]
  )
  return jnp.mean(losses), jnp.asarray(losses.size, jnp.float32)


def systems(graphdef, ks):
  """name -> (tx, steps per global batch, step(params, state, tokens))."""
  adamw = lambda: optax.adamw(1e-4)
  loss = lambda p, t: loss_and_tokens(graphdef, p, t)[0]

  def two_lines(tx):
    def step(params, state, tokens):
      grads = jax.grad(loss)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  def fused_system(k):
    tx = optax_accum.chain(optax_accum.accumulate(k), adamw())

    def fused(params, state, tokens):
      grads = jax.grad(loss)(params, tokens)
      return optax_accum.apply_gradients(tx, grads, state, params)

    return tx, k, fused

  def cross_floor_system(k):
    # k calls of grads + `acc += g`, params untouched: the least any
    # cross-step accumulation can cost (it never applies an update).
    def cross_floor(params, acc, tokens):
      grads = jax.grad(loss)(params, tokens)
      return params, jax.tree.map(jnp.add, acc, grads)

    floor_tx = optax.GradientTransformation(
      optax.tree.zeros_like, lambda u, s, p=None: (u, s)
    )
    return floor_tx, k, cross_floor

  def cond_floor_system(k):
    tx = adamw()

    def cond_floor(params, state, tokens):
      # The best form we know by hand: the sum restarts by a select outside
      # the conditional (no zeroing pass, no sum through its branches).
      (acc, opt_state), count = state
      grads = jax.grad(loss)(params, tokens)
      fresh = count % k == 0
      add = lambda a, g: jnp.where(fresh, g, a + g)
      acc = jax.tree.map(add, acc, grads)

      def end(params, opt_state):
        mean = jax.tree.map(lambda a: a * (1 / k), acc)
        updates, opt_state = tx.update(mean, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      ends = count % k == k - 1
      mid = lambda p, s: (p, s)
      params, opt_state = lax.cond(ends, end, mid, params, opt_state)
      return params, ((acc, opt_state), count + 1)

    init = lambda p: ((optax.tree.zeros_like(p), tx.init(p)), jnp.int32(0))
    unused = lambda u, s, p=None: (u, s)  # the step is `cond_floor`
    return optax.GradientTransformation(init, unused), k, cond_floor

  def in_step_system(k):
    tx = adamw()
    value_and_grad = optax_accum.microbatched_value_and_grad(
      lambda p, t: loss_and_tokens(graphdef, p, t), k
    )

    def in_step(params, state, tokens):
      _, grads, _ = value_and_grad(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return tx, 1, in_step

  def scan_system(k):
    tx = adamw()

    def scan(params, state, tokens):
      micro = tokens.reshape(k, BATCH // k, *tokens.shape[1:])

      def body(acc, t):
        g = jax.grad(loss)(params, t)
        return jax.tree.map(jnp.add, acc, g), None

      acc, _ = lax.scan(body, optax.tree.zeros_like(params), micro)
      grads = jax.tree.map(lambda a: a / k, acc)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return tx, 1, scan

  large = adamw()
  out = {"large": (large, 1, two_lines(large))}
  for k in ks:
    multisteps = optax.MultiSteps(adamw(), k).gradient_transformation()
    out[f"cross_floor_{k}"] = cross_floor_system(k)
    out[f"cond_floor_{k}"] = cond_floor_system(k)
    out[f"fused_{k}"] = fused_system(k)
    out[f"in_step_{k}"] = in_step_system(k)
    out[f"scan_{k}"] = scan_system(k)
    out[f"multisteps_{k}"] = (multisteps, k, two_lines(multisteps))
  return out


def prepare(name, tx, steps, step, graphdef, params, tokens):
  state = tx.init(params)
  micro = tokens.reshape(steps, BATCH // steps, *tokens.shape[1:])
  t0 = time.perf_counter()
  compiled = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, state, micro[0])
    .compile()
  )
  compile_s = time.perf_counter() - t0
  params = jax.tree.map(jnp.copy, params)
  for m in micro:  # warm-up: one global batch
    params, state = compiled(params, state, m)
  jax.block_until_ready(params)
  return {
    "name": name,
    "compiled": compiled,
    "params": params,
    "state": state,
    "micro": micro,
    "compile_s": compile_s,
    "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    "times": [],
  }


def run_one(entry):
  t0 = time.perf_counter()
  for m in entry["micro"]:
    entry["params"], entry["state"] = entry["compiled"](
      entry["params"], entry["state"], m
    )
  jax.block_until_ready(entry["params"])
  entry["times"].append(time.perf_counter() - t0)


def peak_rss_mib():
  """This process's peak resident set (VmHWM; ru_maxrss survives exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_of(name, ks):
  """Peak RSS (MiB) of a fresh process that compiles and runs one system."""
  out = subprocess.run(
    [sys.executable, __file__, "--only", name, "--ks", *map(str, ks)],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  return float(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", nargs="+", type=int, default=[4, 8])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--rss", action="store_true")
  parser.add_argument("--only", help=argparse.SUPPRESS)
  parser.add_argument("--systems", nargs="+", help="prefixes to run")
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  args = parser.parse_args()
  graphdef, params = nnx.split(Transformer(nnx.Rngs(0)), nnx.Param)
  tokens = make_data()
  table = systems(graphdef, args.ks)
  if args.systems:  # large stays: the ratios' denominator
    keep = lambda n: n == "large" or n.startswith(tuple(args.systems))
    table = {n: v for n, v in table.items() if keep(n)}
  if args.only:  # a child of --rss
    tx, steps, step = table[args.only]
    entry = prepare(args.only, tx, steps, step, graphdef, params, tokens)
    run_one(entry)
    print(peak_rss_mib())
    return
  entries = [
    prepare(name, tx, steps, step, graphdef, params, tokens)
    for name, (tx, steps, step) in table.items()
  ]
  for _ in range(args.rounds):
    for entry in entries:
      run_one(entry)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  dev = jax.devices()[0]
  print(
    f"\n{n_params:,} params, global batch {BATCH} x {SEQ} tokens, AdamW; "
    f"jax {jax.__version__}, optax {optax.__version__}, flax "
    f"{__import__('flax').__version__}, {dev.device_kind} ({dev.platform}),"
    f" {platform.machine()}, {os.cpu_count()} cores; medians of "
    f"{args.rounds} rounds\n"
  )
  large = statistics.median(entries[0]["times"])
  rows = []
  for e in entries:
    row = {
      "system": e["name"],
      "s_per_batch": statistics.median(e["times"]),
      "temp_mib": e["temp_mib"],
      "compile_s": e["compile_s"],
    }
    row["vs_large"] = row["s_per_batch"] / large
    row["temp_vs_large"] = e["temp_mib"] / entries[0]["temp_mib"]
    if args.rss:
      row["peak_rss_mib"] = rss_of(e["name"], args.ks)
    rows.append(row)
  print(
    "| system | s per global batch | vs large | XLA temp MiB "
    "| temp vs large |" + (" peak RSS MiB |" if args.rss else "")
  )
  print("|---|---|---|---|---|" + ("---|" if args.rss else ""))
  for r in rows:
    rss = f" {r['peak_rss_mib']:.0f} |" if args.rss else ""
    print(
      f"| {r['system']} | {r['s_per_batch']:.3f} | {r['vs_large']:.2f} "
      f"| {r['temp_mib']:.1f} | {r['temp_vs_large']:.2f} |{rss}"
    )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "train_step.json")
  with open(path, "w") as f:
    json.dump(
      {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": dev.device_kind,
        "params": n_params,
        "rows": rows,
      },
      f,
      indent=1,
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
