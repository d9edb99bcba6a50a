"""plan_microbatches on the 29M transformer: three budgets, both forms.

The model of `train_step.py` (Flax NNX, d=512, 8 layers, ~29M params,
float32, AdamW) on a global batch of 16 sequences of 64 tokens. For each
memory budget (between the cross-step form's peak at micro-batch 1 and at
the whole batch), each form is planned with `optax_accum.plan_microbatches`
(compilations only), then run at the chosen size: the cross-step form as k
donated calls of `apply_gradients(chain(accumulate(k), adamw))`, the
in-step form as one donated call of `microbatched_value_and_grad` over k
micro-batches then AdamW. Prints the chosen micro-batch, k, the predicted
and compiled peak (bytes per device, XLA's memory_analysis: temp +
arguments + outputs - aliased), the compilations the plan took and the
median time per global batch over the rounds (interleaved).

  python benchmarks/plan.py [--rounds 3] [--budgets 0.15 0.5 0.9]
"""

import argparse
import functools
import platform
import statistics
import time

from flax import nnx
import jax
import optax
from train_step import SEQ
from train_step import VOCAB
from train_step import Transformer
from train_step import loss_and_tokens

import optax_accum

GLOBAL = 16


def steps(graphdef):
  """The cross-step and in-step train steps, jitted as users run them."""
  loss = lambda p, t: loss_and_tokens(graphdef, p, t)

  def cross_tx(k):
    return optax_accum.chain(optax_accum.accumulate(k), optax.adamw(1e-4))

  @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="k")
  def cross(params, state, tokens, k=1):
    (_, n), grads = jax.value_and_grad(loss, has_aux=True)(params, tokens)
    return optax_accum.apply_gradients(
      cross_tx(k), grads, state, params, weight=n
    )

  adamw = optax.adamw(1e-4)

  @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="k")
  def in_step(params, state, tokens, k):
    _, grads, _ = optax_accum.microbatched_value_and_grad(loss, k)(
      params, tokens
    )
    updates, state = adamw.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return cross_tx, cross, adamw, in_step


def time_rows(rows, params, tokens, cross_tx, cross, adamw, in_step, rounds):
  """Runs each plan at its size; medians of interleaved rounds, in place."""
  runs = []
  for row in rows:
    if "plan" not in row:
      continue
    p = row["plan"]
    copy = jax.tree.map(lambda x: x.copy(), params)
    if row["form"] == "cross-step":
      tx = cross_tx(p.k)
      micro = tokens.reshape(p.k, p.micro_batch_size, -1)
      run = [copy, tx.init(copy)]

      def one(run=run, micro=micro, k=p.k):
        for m in micro:
          run[0], run[1] = cross(run[0], run[1], m, k=k)
        jax.block_until_ready(run[0])

    else:
      run = [copy, adamw.init(copy)]

      def one(run=run, k=p.k):
        run[0], run[1] = in_step(run[0], run[1], tokens, k=k)
        jax.block_until_ready(run[0])

    one()  # compile and warm up
    row["times"] = []
    runs.append((row, one))
  for _ in range(rounds):
    for row, one in runs:
      t0 = time.perf_counter()
      one()
      row["times"].append(time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--budgets", type=float, nargs="+", default=[0.15, 0.5, 0.9]
  )
  args = parser.parse_args()
  graphdef, params = nnx.split(Transformer(nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params) if hasattr(nnx, "as_pure") else params
  tokens = jax.random.randint(jax.random.key(1), (GLOBAL, SEQ + 1), 0, VOCAB)
  cross_tx, cross, adamw, in_step = steps(graphdef)
  plan = optax_accum.plan_microbatches
  state = cross_tx(1).init(params)
  most = plan(
    cross, params, state, tokens, batch_argnums=2, memory_limit=10**15
  )
  most = most.peak_bytes  # the whole batch: k = 1
  m = cross.lower(params, state, tokens[:1]).compile().memory_analysis()
  least = (
    m.temp_size_in_bytes
    + m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
  )
  rows = []
  for f in args.budgets:
    limit = int(least + f * (most - least))
    for form in ("cross-step", "in-step"):
      t0 = time.perf_counter()
      try:
        if form == "cross-step":
          p = plan(
            cross, params, state, tokens, batch_argnums=2, memory_limit=limit
          )
        else:
          s = adamw.init(params)
          p = plan(
            in_step,
            params,
            s,
            tokens,
            batch_argnums=2,
            memory_limit=limit,
            k_argname="k",
          )
      except ValueError as e:
        rows.append({"budget": limit, "form": form, "error": str(e)})
        continue
      rows.append(
        {
          "budget": limit,
          "form": form,
          "plan": p,
          "plan_s": time.perf_counter() - t0,
        }
      )
  time_rows(rows, params, tokens, cross_tx, cross, adamw, in_step, args.rounds)
  mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"
  print(
    f"# jax {jax.__version__}, optax {optax.__version__}, "
    f"{platform.machine()}, {jax.devices()[0].device_kind}, "
    f"{jax.device_count()} device(s); global batch {GLOBAL}x{SEQ} tokens; "
    f"whole-batch peak {mib(most)} MiB, micro-batch-1 peak {mib(least)} MiB"
  )
  print(
    "| budget MiB | form | micro-batch | k | predicted MiB | compiled MiB "
    "| compilations | plan s | s per global batch |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    if "plan" not in row:
      print(
        f"| {mib(row['budget'])} | {row['form']} | does not fit: "
        f"{row['error']} |||||||"
      )
      continue
    p = row["plan"]
    print(
      f"| {mib(row['budget'])} | {row['form']} | {p.micro_batch_size} | {p.k} "
      f"| {mib(p.predicted_bytes)} | {mib(p.peak_bytes)} | {len(p.probes)} "
      f"| {row['plan_s']:.1f} | {statistics.median(row['times']):.2f} |"
    )


if __name__ == "__main__":
  main()
