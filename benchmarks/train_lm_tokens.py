"""Token-weighted accumulation on a character-level transformer (Flax NNX).

The text is the source of Python's own standard library (real text that
ships with every Python). Sequences have random lengths and are padded, so
micro-batches hold different numbers of tokens. The loss the user wants is
the mean over every token of the global batch. Three runs, same initial
parameters, same sequences in the same order:

  large       one AdamW step per 16 sequences on the global token-mean loss;
  weighted    4 micro-batches of 4 sequences, each with its own token-mean
              loss, through optax_accum.chain(accumulate(4), adamw) with
              `weight` = the micro-batch's token count;
  unweighted  the same without `weight`: the mean of per-micro-batch means
              (the bug of transformers #15020/#24725, fixed in PR #34191);
  reordered   the large batch again with each step's 16 sequences shuffled:
              the same mathematics summed in another order, so its distance
              to `large` is the float32 noise floor of this training run.

Prints max |param - large| and the final loss, saves a loss-curve PNG.
AdamW turns a relative rounding difference in a near-zero gradient entry
into an absolute parameter difference of about lr times that (its update is
g / sqrt(v)), so the floor is above 1e-7. The attention layers have no
biases: the key bias has a gradient that is zero in exact arithmetic
(softmax ignores a constant added to a row) and pure rounding noise in
float32, which AdamW blows up to steps of size lr in every run alike.

  python benchmarks/train_lm_tokens.py [--steps 40] [--out benchmarks/out]
"""

import argparse
import json
import os
import platform

from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax
from tqdm import tqdm

import optax_accum

K, MICRO, MAX_LEN = 4, 4, 64
VOCAB, DIM, HEADS, LAYERS = 128, 64, 4, 2
TOLERANCE = 1e-5


def load_text(n_bytes=400_000):
  """ASCII text of the standard library's own .py files, in a fixed order."""
  root = os.path.dirname(os.__file__)
  chunks, size = [], 0
  for name in sorted(os.listdir(root)):
    if name.endswith(".py"):
      with open(os.path.join(root, name), "rb") as f:
        data = bytes(b for b in f.read() if b < VOCAB)
      chunks.append(data)
      size += len(data)
      if size >= n_bytes:
        break
  return np.frombuffer(b"".join(chunks)[:n_bytes], np.uint8).astype(np.int32)


def make_batches(text, steps, seed=0):
  """steps x (K*MICRO) padded sequences of random length 8..MAX_LEN+1."""
  rng = np.random.default_rng(seed)
  n = steps * K * MICRO
  lengths = rng.integers(8, MAX_LEN + 2, size=n)
  starts = rng.integers(0, len(text) - MAX_LEN - 2, size=n)
  tokens = np.zeros((n, MAX_LEN + 1), np.int32)
  mask = np.zeros((n, MAX_LEN), np.float32)
  for i, (s, length) in enumerate(zip(starts, lengths)):
    tokens[i, :length] = text[s : s + length]
    mask[i, : length - 1] = 1.0  # targets that are real tokens
  shape = (steps, K * MICRO)
  return tokens.reshape(*shape, -1), mask.reshape(*shape, -1)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=DIM, decode=False, use_bias=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
    self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.pos = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (MAX_LEN, DIM))
    )
    self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.ln = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def token_sum_loss(model, tokens, mask):
  logits = model(tokens[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.sum(ce * mask)


def token_mean_loss(model, tokens, mask):
  return token_sum_loss(model, tokens, mask) / jnp.sum(mask)


@nnx.jit
def step(model, optimizer, tokens, mask, weight):
  loss, grads = nnx.value_and_grad(token_mean_loss)(model, tokens, mask)
  optimizer.update(model, grads, weight=weight)
  return loss


@nnx.jit
def step_plain(model, optimizer, tokens, mask):
  loss, grads = nnx.value_and_grad(token_mean_loss)(model, tokens, mask)
  optimizer.update(model, grads)
  return loss


def run(name, tx, micro, weighted, batches, lr_steps):
  model = CharTransformer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens, mask = batches
  losses, trajectory, noise = [], [], []
  for t in tqdm(range(lr_steps), desc=name, leave=False):
    window_sum, window_tokens = 0.0, 0.0
    for i in range(0, K * MICRO, micro):
      tk, mk = (
        jnp.asarray(tokens[t, i : i + micro]),
        jnp.asarray(mask[t, i : i + micro]),
      )
      n = jnp.sum(mk)
      if weighted:
        loss = step(model, optimizer, tk, mk, n)
      else:
        loss = step_plain(model, optimizer, tk, mk)
      window_sum += float(loss) * float(n)
      window_tokens += float(n)
    losses.append(window_sum / window_tokens)  # global token-mean loss
    pure = nnx.as_pure(optimizer.opt_state)
    if any(s.noise_scale is not None for s in _accumulate_states(pure)):
      noise.append(float(optax_accum.gradient_noise_scale(pure)))
    trajectory.append(
      np.concatenate(
        [np.ravel(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param))]
      )
    )
  return nnx.state(model, nnx.Param), np.asarray(losses), trajectory, noise


def _accumulate_states(tree):
  is_acc = lambda x: isinstance(x, optax_accum.AccumulateState)
  return [s for s in jax.tree.leaves(tree, is_leaf=is_acc) if is_acc(s)]


def max_abs_diff(a, b):
  return max(
    float(jnp.max(jnp.abs(p - q)))
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  text = load_text()
  batches = make_batches(text, args.steps)
  counts = batches[1].reshape(args.steps, K, MICRO, -1).sum((2, 3))
  adamw = lambda: optax.adamw(args.lr, weight_decay=1e-2)
  chain = lambda track=False: optax_accum.chain(
    optax_accum.accumulate(K, track_noise_scale=track), adamw()
  )
  perm = np.random.default_rng(7).permutation(K * MICRO)
  reordered = (batches[0][:, perm], batches[1][:, perm])
  results = {
    "large batch (16 seq)": run(
      "large", adamw(), K * MICRO, False, batches, args.steps
    ),
    "large batch, sequences reordered (noise floor)": run(
      "reordered", adamw(), K * MICRO, False, reordered, args.steps
    ),
    "accumulate, weight=tokens": run(
      "weighted", chain(track=True), MICRO, True, batches, args.steps
    ),
    "accumulate, no weight": run(
      "unweighted", chain(), MICRO, False, batches, args.steps
    ),
  }
  ref = results["large batch (16 seq)"][0]
  print(
    f"\n{len(text):,} characters of the standard library's source; "
    f"{args.steps} gradient steps of {K} micro-batches x {MICRO} "
    f"sequences; tokens per micro-batch {counts.min()}..{counts.max()}"
  )
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, "
    f"{jax.devices()[0].platform}, {platform.machine()}, "
    f"{os.cpu_count()} cores\n"
  )
  print("| run | max abs param diff vs large batch | final token-mean loss |")
  print("|---|---|---|")
  rows = []
  for name, (params, losses, _, _) in results.items():
    d = max_abs_diff(params, ref)
    rows.append(
      {"run": name, "max_abs_param_diff": d, "final_loss": float(losses[-1])}
    )
    print(f"| {name} | {d:.2e} | {losses[-1]:.4f} |")
  floor, weighted, unweighted = (r["max_abs_param_diff"] for r in rows[1:])

  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
  ref_traj = results["large batch (16 seq)"][2]
  for name, (_, _, traj, _) in list(results.items())[1:]:
    ax1.plot(
      [np.max(np.abs(a - b)) for a, b in zip(traj, ref_traj)], label=name
    )
  ax1.axhline(TOLERANCE, color="gray", ls=":", lw=1)
  ax1.set_yscale("log")
  ax1.set_xlabel("gradient step")
  ax1.set_ylabel("max |param - large-batch param|")
  ax1.legend(fontsize=8)
  ax2.plot(counts, lw=0.8)
  ax2.set_xlabel("gradient step")
  ax2.set_ylabel("tokens in each of the 4 micro-batches")
  noise = results["accumulate, weight=tokens"][3]
  ax3.plot(noise, label="B_simple (gradient_noise_scale), tokens")
  ax3.plot(counts.sum(1), label="tokens in the global batch")
  ax3.set_yscale("log")
  ax3.set_xlabel("gradient step")
  ax3.legend(fontsize=8)
  fig.suptitle("Character transformer on stdlib source: token weighting")
  fig.tight_layout()
  png = os.path.join(args.out, "train_lm_tokens.png")
  fig.savefig(png, dpi=120)
  with open(os.path.join(args.out, "train_lm_tokens.json"), "w") as f:
    json.dump(
      {"jax": jax.__version__, "optax": optax.__version__, "rows": rows},
      f,
      indent=2,
    )
  print(
    f"\nnoise floor (reordered vs large): {floor:.2e}; "
    f"weighted vs large: {weighted:.2e} "
    f"({'within' if weighted <= TOLERANCE else 'OUTSIDE'} "
    f"{TOLERANCE:g}); unweighted vs large: {unweighted:.2e}\nwrote {png}"
  )
  print(
    f"B_simple (tokens) at steps 10/20/{args.steps}: "
    + ", ".join(f"{noise[i - 1]:.0f}" for i in (10, 20, args.steps))
    + f"; the global batch holds {counts.sum(1).mean():.0f} tokens on average"
  )
  if weighted > TOLERANCE:
    raise SystemExit(f"weighted run differs by {weighted:.2e}")


if __name__ == "__main__":
  main()
