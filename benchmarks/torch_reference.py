"""The paper's EM-like vs SGD experiment in plain PyTorch, run the way the authors' reference code runs it.

The same protocol as ``gradattn em-vs-sgd``, written independently for the end-to-end timing
(benchmarks/experiment_time.py): seeds one after another, eager autograd, full batch, one step at a
time with the loss read back (``loss.item()``) after every step.

Task: the sticky Markov chain over C = 8 symbols. Row i of the transition matrix starts from 0.3 on
the diagonal and 1 / (circular distance) elsewhere, is scaled to sum to 0.7, then 0.3 is added to
the diagonal. Symbol embeddings mu (8 x 20) are ``torch.randn`` after ``torch.manual_seed(0)``,
shared by all seeds. Per seed (``torch.manual_seed(seed)``): y_0 uniform, y_t drawn from the chain,
x_t = mu[y_{t-1}] + N(0, I) for t = 1 .. T-1 (T = 2000: N = 1999 positions), and one head with
W_Q, W_K (20 x 10), W_V (20 x 15), W_O (15 x 8), every entry N(0, 0.1^2), causal attention with
scores q.k / sqrt(10). Both arms start from these parameters on this sequence: SGD at 0.01 on all
four matrices, EM-like at 0.1 on W_V and 0.01 on the others; 1000 steps each. At the end, on the
training sequence: loss, mean predictive entropy, accuracy. Summary: threshold = mean of SGD's
final losses; per seed the first step at which EM-like's loss falls below it; speed-up = steps /
mean of those.

``--attention eager`` builds the N x N softmax explicitly (as the reference code does);
``--attention sdpa`` uses torch's fused scaled_dot_product_attention (q, k, v zero-padded to a head
size of 16; scale 1/sqrt(d_k); is_causal), restricted to fused kernels so it never falls back to
the unfused path silently.

    python benchmarks/torch_reference.py --seeds 5 --steps 1000 --out torch_em_vs_sgd.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

T_IMPORTED = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (imports neither JAX nor gradattn: this process's wall time is measured)

# The protocol's sizes and rates. The other benchmarks read them from the library (the defaults of
# gradattn.experiments.EmVsSgdConfig and its task); this process states them itself, since importing
# gradattn imports JAX and this process is timed from its start. experiment_time.py checks them
# against the library's before it runs this script.
C, D_IN = 8, 20  # symbols (classes) and input size
HEAD = dict(d_in=D_IN, d_k=10, d_v=15, n_classes=C)
LR = 0.01  # SGD on all four matrices, and the EM-like arm on W_Q, W_K, W_O
EM_VALUE_LR = 0.1  # the EM-like arm's rate on W_V
INIT_SCALE = 0.1
SELF_PROB = 0.3


def transition_matrix(c: int = C, self_prob: float = SELF_PROB) -> torch.Tensor:
    i = torch.arange(c)
    dist = (i[:, None] - i[None, :]).abs()
    dist = torch.minimum(dist, c - dist)
    r = torch.where(dist == 0, torch.tensor(self_prob, dtype=torch.float64), 1.0 / dist.clamp(min=1).double())
    r = r / r.sum(dim=1, keepdim=True) * (1.0 - self_prob)
    return r + self_prob * torch.eye(c, dtype=torch.float64)


def sample_sequence(p: torch.Tensor, mu: torch.Tensor, seq_len: int):
    """One chain of ``seq_len`` symbols from the global torch generator; returns (x (T-1, d), y (T-1,))."""
    symbols = [int(torch.randint(0, C, (1,)))]
    for _ in range(seq_len - 1):
        symbols.append(int(torch.multinomial(p[symbols[-1]], 1)))
    symbols = torch.tensor(symbols)
    x = mu[symbols[:-1]] + torch.randn(seq_len - 1, mu.shape[1])
    return x, symbols[1:]


class Head(torch.nn.Module):
    def __init__(self, init: list[torch.Tensor], attention: str, n: int):
        super().__init__()
        self.w_q, self.w_k, self.w_v, self.w_o = (torch.nn.Parameter(w.clone()) for w in init)
        self.attention = attention
        self.register_buffer("future", torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = (self.w_q, self.w_k, self.w_v, self.w_o)
        if self.attention == "eager":
            return H.torch_logits(x, *weights, future=self.future)
        with sdpa_kernel(H.sdpa_backends(x.device)):
            return H.torch_logits(x, *weights)


def train_arm(init, x, y, lrs: dict[str, float], steps: int, attention: str, device) -> dict:
    model = Head(init, attention, x.shape[0]).to(device)
    groups = [{"params": [getattr(model, name)], "lr": lr} for name, lr in lrs.items()]
    opt = torch.optim.SGD(groups)
    curve = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        curve.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
        logp = torch.log_softmax(logits, dim=-1)
        return {"curve": curve, "final_loss": F.cross_entropy(logits, y).item(),
                "final_entropy": (-(logp.exp() * logp).sum(-1)).mean().item(),
                "final_accuracy": (logits.argmax(-1) == y).float().mean().item()}


def summarise(per_seed: list[dict], steps: int) -> dict:
    out = {}
    for arm in ("sgd", "em"):
        finals = np.array([r[arm]["final_loss"] for r in per_seed])
        out[arm] = {"final_loss_mean": float(finals.mean()), "final_loss_std": float(finals.std()),
                    "final_entropy_mean": float(np.mean([r[arm]["final_entropy"] for r in per_seed])),
                    "final_accuracy_mean": float(np.mean([r[arm]["final_accuracy"] for r in per_seed]))}
    threshold = out["sgd"]["final_loss_mean"]
    curves = np.array([r["em"]["curve"] for r in per_seed])
    below = curves < threshold
    to_thr = np.where(below.any(axis=1), below.argmax(axis=1), steps)
    out.update(threshold=threshold, em_steps_to_sgd_final={"mean": float(to_thr.mean()), "std": float(to_thr.std())},
               speedup=steps / float(to_thr.mean()) if to_thr.mean() > 0 else None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="run seeds 0..n-1, one after another (default 5)")
    ap.add_argument("--steps", type=int, default=1000, help="updates per arm (default 1000)")
    ap.add_argument("--seq-len", type=int, default=2000, help="sequence length T (default 2000)")
    ap.add_argument("--attention", choices=("eager", "sdpa"), default="eager")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--out", required=True, help="results JSON path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    H.torch_setup(device)
    p = transition_matrix()
    torch.manual_seed(0)
    mu = torch.randn(C, D_IN)
    per_seed, seed_s = [], []
    for seed in range(args.seeds):
        t = time.perf_counter()
        torch.manual_seed(seed)
        x, y = sample_sequence(p, mu, args.seq_len)
        init = [INIT_SCALE * torch.randn(*shape) for shape in H.head_shapes(HEAD)]
        x, y, init = x.to(device), y.to(device), [w.to(device) for w in init]
        result = {
            "sgd": train_arm(init, x, y, {name: LR for name in H.PARAMS}, args.steps, args.attention, device),
            "em": train_arm(init, x, y, {name: EM_VALUE_LR if name == "w_v" else LR for name in H.PARAMS},
                            args.steps, args.attention, device),
        }
        per_seed.append(result)
        seed_s.append(time.perf_counter() - t)
        print(f"seed {seed}: SGD {result['sgd']['final_loss']:.4f}, EM-like {result['em']['final_loss']:.4f} "
              f"({seed_s[-1]:.1f} s)", flush=True)
    summary = summarise(per_seed, args.steps)
    payload = {
        "implementation": f"PyTorch {torch.__version__}, eager autograd, attention={args.attention}",
        "seeds": list(range(args.seeds)), "steps": args.steps, "seq_len": args.seq_len, **summary,
        "per_seed": [{arm: {k: v for k, v in r[arm].items() if k != "curve"} for arm in ("sgd", "em")}
                     for r in per_seed],
        "timing": {"import_s": T_IMPORTED - T_START, "seed_s": seed_s, "threads": torch.get_num_threads(),
                   "in_process_s": time.perf_counter() - T_START},
    }
    H.write_json(args.out, payload)
    print(f"SGD {summary['sgd']['final_loss_mean']:.4f} ± {summary['sgd']['final_loss_std']:.3f}, EM-like "
          f"{summary['em']['final_loss_mean']:.4f} ± {summary['em']['final_loss_std']:.3f}; EM-like reaches SGD's "
          f"mean final loss in {summary['em_steps_to_sgd_final']['mean']:.0f} steps; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
