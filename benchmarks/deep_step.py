"""One training step of the deep transformer: gradattn (JAX) against the same model in PyTorch.

    python benchmarks/deep_step.py             # T = 2000 (N = 1999), the experiment's size
    python benchmarks/deep_step.py --quick     # N = 255, fewer repeats (seconds)

Each contender runs a full training step (forward, backward, AdamW with global-norm clipping) of
the 4-layer, 4-head, d_model 64 model on one sequence, dropout off so that all compute the same
numbers:

* ``jax``: ``gradattn.nn.Transformer`` under ``jit`` (the step of ``gradattn.experiments.deep``: its model,
  optimiser and loss, ``gradattn.deep.laws.mean_loss``);
* ``torch_eager``: the PyTorch model with explicit attention weights (as the reference code does);
* ``torch_sdpa``: the same model with ``torch.nn.functional.scaled_dot_product_attention``;
* ``jax_vmap_S``: S seeds vmapped in one call, reported per seed.

First the weights of the JAX model are copied into PyTorch and both losses compared; then the
contenders are timed interleaved, several rounds, medians reported. Writes JSON (device kind,
versions, per-step milliseconds) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


def _torch_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d_model, n_heads, dropout, sdpa=False):
            super().__init__()
            self.n_heads, self.dropout, self.sdpa = n_heads, dropout, sdpa
            self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
            self.v_proj, self.o_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
            self.ff_1, self.ff_2 = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
            self.drop = nn.Dropout(dropout)

        def forward(self, x):
            n, d = x.shape
            hd = d // self.n_heads
            a = self.ln_1(x)
            q, k, v = (p(a).view(n, self.n_heads, hd).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
            if self.sdpa:
                g = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
            else:
                s = q @ k.transpose(-2, -1) / math.sqrt(hd)
                mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                g = self.drop(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)) @ v
            x = x + self.o_proj(g.transpose(0, 1).reshape(n, d))
            return x + self.drop(self.ff_2(self.drop(F.gelu(self.ff_1(self.ln_2(x))))))

    class TorchTransformer(nn.Module):
        """The deep model in PyTorch (nn.Linear / nn.LayerNorm defaults, exact GELU)."""

        def __init__(self, d_in=20, d_model=64, n_layers=4, n_heads=4, n_classes=8, dropout=0.1, sdpa=False):
            super().__init__()
            self.in_proj = nn.Linear(d_in, d_model)
            self.blocks = nn.ModuleList([Block(d_model, n_heads, dropout, sdpa) for _ in range(n_layers)])
            self.ln_f = nn.LayerNorm(d_model)
            self.out_proj = nn.Linear(d_model, n_classes)

        def forward(self, x):
            h = self.in_proj(x)
            for b in self.blocks:
                h = b(h)
            return self.out_proj(self.ln_f(h))

    return torch, TorchTransformer


def __getattr__(name):  # TorchTransformer is built on first use, so importing this file needs no torch
    if name == "TorchTransformer":
        return _torch_modules()[1]
    raise AttributeError(name)


def copy_weights(jax_model, torch_model) -> None:
    """Copy a ``gradattn.nn.Transformer``'s parameters into a ``TorchTransformer`` of the same sizes
    (flax kernels are (in, out); PyTorch weights (out, in))."""
    import torch

    def lin(src, dst):
        dst.weight.data = torch.from_numpy(np.array(src.kernel[...]).T.copy()).to(dst.weight.dtype)
        dst.bias.data = torch.from_numpy(np.array(src.bias[...])).to(dst.bias.dtype)

    def ln(src, dst):
        dst.weight.data = torch.from_numpy(np.array(src.scale[...])).to(dst.weight.dtype)
        dst.bias.data = torch.from_numpy(np.array(src.bias[...])).to(dst.bias.dtype)

    lin(jax_model.in_proj, torch_model.in_proj)
    for s, d in zip(jax_model.blocks, torch_model.blocks):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "ff_1", "ff_2"):
            lin(getattr(s, name), getattr(d, name))
        ln(s.ln_1, d.ln_1)
        ln(s.ln_2, d.ln_2)
    ln(jax_model.ln_f, torch_model.ln_f)
    lin(jax_model.out_proj, torch_model.out_proj)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 255, 3 rounds (a smoke run)")
    parser.add_argument("--n", type=int, default=None,
                        help="positions per sequence (default: the deep experiment's, 1999; 255 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; 3 with --quick)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds vmapped for the per-seed cost (default 4)")
    parser.add_argument("--out", default="deep_step.json", help="JSON output (default deep_step.json)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    reps = 2 if args.quick else 3

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gradattn.deep.laws import mean_loss, pure_apply
    from gradattn.experiments.deep import DeepConfig, deep_optimizer, init_model

    torch, TorchTransformer = _torch_modules()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    default = DeepConfig()
    n = args.n or (255 if args.quick else default.task.n_positions)
    config = dataclasses.replace(default, dropout=0.0, task=dataclasses.replace(default.task, seq_len=n + 1))
    model = init_model(config, jax.random.key(0))
    x, y = config.task.sample(jax.random.key(1))
    tx = deep_optimizer(config)
    graphdef, params = nnx.split(model, nnx.Param)
    apply = pure_apply(graphdef)
    n_params = sum(a.size for a in jax.tree.leaves(params))

    def loss(p, x, y):
        return mean_loss(apply(p, x), y, None)

    @jax.jit
    def jax_step(p, opt_state, x, y):
        value, g = jax.value_and_grad(loss)(p, x, y)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    def init_seed(key):
        m = init_model(config, key)
        p = nnx.split(m, nnx.Param)[1]
        return p, tx.init(p)

    keys = jax.random.split(jax.random.key(2), args.seeds)
    vp, vs = jax.vmap(init_seed)(keys)
    vx = jnp.broadcast_to(x, (args.seeds,) + x.shape)
    vy = jnp.broadcast_to(y, (args.seeds,) + y.shape)
    vstep = jax.jit(jax.vmap(jax_step))

    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    contenders = {}
    opt_state = tx.init(params)
    state = {"jax": (params, opt_state), "vmap": (vp, vs)}

    def run_jax():
        p, s, v = jax_step(*state["jax"], x, y)
        jax.block_until_ready(v)
        return float(v)

    def run_vmap():
        p, s, v = vstep(*state["vmap"], vx, vy)
        jax.block_until_ready(v)
        return float(v[0])

    contenders["jax"] = run_jax
    contenders[f"jax_vmap_{args.seeds}"] = run_vmap
    torch_losses = {}
    for name, sdpa in (("torch_eager", False), ("torch_sdpa", True)):
        tm = TorchTransformer(d_in=config.task.d_in, d_model=config.d_model, n_layers=config.n_layers,
                              n_heads=config.n_heads, n_classes=config.task.n_classes, dropout=0.0, sdpa=sdpa)
        copy_weights(model, tm)
        opt = torch.optim.AdamW(tm.parameters(), lr=config.lr, weight_decay=config.weight_decay)

        def run_torch(tm=tm, opt=opt):
            opt.zero_grad(set_to_none=True)
            out = torch.nn.functional.cross_entropy(tm(xt), yt)
            out.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), config.clip)
            opt.step()
            return float(out.detach())

        with torch.no_grad():
            torch_losses[name] = float(torch.nn.functional.cross_entropy(tm(xt), yt))
        contenders[name] = run_torch

    jax_loss = float(loss(params, x, y))
    print(f"loss at the same weights: jax {jax_loss:.6f}  " + "  ".join(f"{k} {v:.6f}" for k, v in torch_losses.items()))
    for name, v in torch_losses.items():
        if abs(v - jax_loss) > H.CHECK_TOL * max(1.0, abs(jax_loss)):
            raise H.BenchmarkError(f"{name} computes a different loss ({v} vs {jax_loss}); nothing was timed")

    for fn in contenders.values():  # compile / warm up
        fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(H.timed(lambda _, fn=fn: fn(), reps)[0] * 1e3)
    med = {name: H.median(ts) for name, ts in times.items()}
    med[f"jax_vmap_{args.seeds}_per_seed"] = med[f"jax_vmap_{args.seeds}"] / args.seeds

    m = H.machine(H.local_backend())
    result = {
        "benchmark": "deep_step",
        "n_positions": n,
        "model": f"{config.n_layers} layers x {config.n_heads} heads, d_model {config.d_model}, {n_params:,} parameters",
        "device_kind": m["device_kind"],
        "platform": m["os"],
        "processor": m["cpu_model"],
        "versions": {**m["versions"], "python": m["python"]},
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "reps_per_round": reps,
        "loss_at_same_weights": {"jax": jax_loss, **torch_losses},
        "ms_per_step_median": med,
        "ms_per_step_rounds": times,
        "torch_eager_over_jax": med["torch_eager"] / med["jax"],
        "torch_sdpa_over_jax": med["torch_sdpa"] / med["jax"],
        "machine": m,
    }
    H.write_json(args.out, result)
    print(f"one training step, N = {n}, {result['device_kind']} (median of {rounds} interleaved rounds)")
    print(f"{'contender':<24}{'ms / step':>12}{'x jax':>9}")
    for name, ms in med.items():
        print(f"{name:<24}{ms:12.1f}{ms / med['jax']:9.2f}")
    print("machine:", H.describe(m))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    H.run_main(main)
