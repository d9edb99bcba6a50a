"""Accumulator precision over long windows: float32 and bfloat16.

For windows of k = 64 and 256 micro-batches of bfloat16 gradients (1M
values each, two shapes of data: centred noise, and noise on a common
offset where a running bf16 sum drops small contributions), accumulates with
each `accumulator_dtype` and compares the emitted mean with the float64 mean.
Reports the max and RMS error relative to the mean's RMS, and the
accumulator's bytes per parameter.

  python benchmarks/precision.py
"""

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_accum

N = 1 << 20
MODES = {
  "float32": (jnp.float32, 4),
  "bfloat16": (jnp.bfloat16, 2),
}
DATA = {
  "noise N(0,1)": lambda rng: rng.normal(size=N),
  "1 + N(0,0.01)": lambda rng: 1.0 + 0.01 * rng.normal(size=N),
}


def errors(mode, k, data, seed=0):
  rng = np.random.default_rng(seed)
  grads = [jnp.asarray(data(rng), jnp.bfloat16) for _ in range(k)]
  exact = np.zeros(N)
  for g in grads:
    exact += np.asarray(g, np.float64)
  exact /= k
  tx = optax_accum.accumulate(k, accumulator_dtype=mode)
  params = jnp.zeros(N, jnp.float32)
  state = tx.init(params)
  step = jax.jit(tx.update, donate_argnums=1)
  for g in grads:
    # float32 updates, so the emitted mean is not rounded to bf16 on output.
    u, state = step(g.astype(jnp.float32), state, params)
  err = np.asarray(u, np.float64) - exact
  scale = np.sqrt(np.mean(exact**2))
  return np.max(np.abs(err)) / scale, np.sqrt(np.mean(err**2)) / scale


def main():
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, "
    f"{jax.devices()[0].platform}, {platform.machine()}, "
    f"{os.cpu_count()} cores; {N:,} values, bf16 gradients\n"
  )
  print(
    "| data | k | accumulator_dtype | bytes/param | max rel err | rms rel err |"
  )
  print("|---|---|---|---|---|---|")
  for data_name, data in DATA.items():
    for k in (64, 256):
      for name, (mode, nbytes) in MODES.items():
        mx, rms = errors(mode, k, data)
        print(
          f"| {data_name} | {k} | {name} | {nbytes} | {mx:.2e} | {rms:.2e} |"
        )


if __name__ == "__main__":
  main()
