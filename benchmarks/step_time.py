"""Time one training step of the paper's configuration (SPEC §4): JAX variants against PyTorch eager.

One step = loss + gradients + an SGD update (lr 0.01), jitted, at N = 1999, d_in = 20, d_k = 10,
d_v = 15, C = 8, causal, float32. Variants, each in its own process, timed in alternating rounds:

  blocked      gradattn.analytic_loss_and_grads: the fused blocked pass of the laws (the default)
  loss_fn_vjp  jax.value_and_grad(gradattn.loss_fn): the same pass behind loss_fn's custom VJP
  dense_laws   gradattn.dense_loss_and_grads: the laws on whole N x N matrices
  autodiff     jax.value_and_grad(gradattn.dense_loss): XLA's own reverse mode of the dense loss
  torch        PyTorch eager autograd of the same model + torch.optim.SGD (skipped if not importable)

It also measures this machine's floor (SPEC §4): the time of one dense f32 matmul with the step's
multiply-adds (the six N x N x d products, causal half: N^2 (3 d_k + 3 d_v) FLOP) plus jnp.exp of
N^2 / 2 numbers; and the compile time of a 1000-step training ``lax.scan``.

    python benchmarks/step_time.py            # ~2 minutes
    python benchmarks/step_time.py --quick    # smoke run, ~1 minute

Writes benchmarks/results/step_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

SPEC_FLOOR_MS = 2.0  # SPEC §4: ~1 ms of arithmetic + ~1 ms of exponentials on a CI-class 2-core CPU
CONFIG = dict(d_in=20, d_k=10, d_v=15, n_classes=8, lr=0.01)
JAX_VARIANTS = ("blocked", "loss_fn_vjp", "dense_laws", "autodiff")


def _data(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, CONFIG["d_in"])).astype(np.float32)
    y = rng.integers(0, CONFIG["n_classes"], n).astype(np.int32)
    shapes = [(CONFIG["d_in"], CONFIG["d_k"]), (CONFIG["d_in"], CONFIG["d_k"]), (CONFIG["d_in"], CONFIG["d_v"]),
              (CONFIG["d_v"], CONFIG["n_classes"])]
    weights = [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    return x, y, weights


def jax_grad_source(variant: str, block_size):
    """``(params, x, y) -> (loss, grads)`` for one JAX variant."""
    import jax

    import gradattn as ga

    if variant == "blocked":
        from gradattn.blocked import blocked_loss_and_grads

        return lambda p, x, y: blocked_loss_and_grads(p, x, y, None, True, block_size)
    if variant == "loss_fn_vjp":
        return lambda p, x, y: jax.value_and_grad(ga.loss_fn)(p, x, y, None, True, block_size)
    if variant == "dense_laws":
        return lambda p, x, y: ga.dense_loss_and_grads(p, x, y)
    if variant == "autodiff":
        return lambda p, x, y: jax.value_and_grad(ga.dense_loss)(p, x, y)
    raise ValueError(variant)


def jax_worker(spec):
    import jax
    import jax.numpy as jnp
    import optax

    import gradattn as ga

    x_np, y_np, w_np = _data(spec["n"])
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = ga.HeadParams(*map(jnp.asarray, w_np))
    opt = optax.sgd(CONFIG["lr"])
    grad_source = jax_grad_source(spec["variant"], spec.get("block_size"))

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = grad_source(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, opt.init(params)]

    def setup():
        t = time.perf_counter()
        compiled = step.lower(*state, x, y).compile()
        compile_s = time.perf_counter() - t
        state[0], state[1], _ = compiled(*state, x, y)
        jax.block_until_ready(state[0])
        state.append(compiled)
        return {"compile_s": compile_s}

    def timed(steps):
        compiled = state[2]
        t = time.perf_counter()
        p, s = state[0], state[1]
        for _ in range(steps):
            p, s, loss = compiled(p, s, x, y)
        jax.block_until_ready(p)
        state[0], state[1] = p, s
        return {"seconds": (time.perf_counter() - t) / steps}

    H.serve(setup, timed)


def torch_worker(spec):
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    n = spec["n"]
    x_np, y_np, w_np = _data(n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()
    ws = [torch.from_numpy(w).requires_grad_() for w in w_np]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    opt = torch.optim.SGD(ws, lr=CONFIG["lr"])
    scale = 1.0 / np.sqrt(CONFIG["d_k"])

    def step():
        w_q, w_k, w_v, w_o = ws
        q, k, v = x @ w_q, x @ w_k, x @ w_v
        alpha = torch.softmax((q @ k.T * scale).masked_fill(future, float("-inf")), dim=-1)
        loss = torch.nn.functional.cross_entropy((alpha @ v) @ w_o, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    def setup():
        for _ in range(3):
            step()
        return {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def timed(steps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return {"seconds": (time.perf_counter() - t) / steps}

    H.serve(setup, timed)


def floor_worker(spec):
    """This machine's floor: a dense f32 matmul of the step's FLOPs, plus exp of N^2/2 numbers."""
    import jax
    import jax.numpy as jnp

    n = spec["n"]
    flops = n * n * (3 * CONFIG["d_k"] + 3 * CONFIG["d_v"])  # 2 * (N^2 / 2) * (3 d_k + 3 d_v)
    m = round((flops / 2) ** (1 / 3))
    a = jax.random.normal(jax.random.PRNGKey(0), (m, m), jnp.float32)
    e = jax.random.normal(jax.random.PRNGKey(1), (n * n // 2,), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    exp = jax.jit(jnp.exp)

    def setup():
        jax.block_until_ready((matmul(a), exp(e)))
        return {"flops": flops, "matmul_side": m, "exp_count": n * n // 2}

    def timed(steps):
        t = time.perf_counter()
        for _ in range(steps):
            out = matmul(a)
        jax.block_until_ready(out)
        t_mm = (time.perf_counter() - t) / steps
        t = time.perf_counter()
        for _ in range(steps):
            out = exp(e)
        jax.block_until_ready(out)
        t_exp = (time.perf_counter() - t) / steps
        return {"seconds": t_mm + t_exp, "matmul_s": t_mm, "exp_s": t_exp}

    H.serve(setup, timed)


def scan_compile_worker(spec):
    """Compile time of a 1000-step training scan (gradattn.training.train when it exists)."""
    import jax
    import jax.numpy as jnp
    import optax

    import gradattn as ga

    x_np, y_np, w_np = _data(spec["n"])
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = ga.HeadParams(*map(jnp.asarray, w_np))
    steps = spec["steps"]
    try:
        from gradattn.training import sgd, train

        run = jax.jit(lambda p, x, y: train(p, x, y, sgd(CONFIG["lr"]), steps)[1]["loss"])
        source = "gradattn.training.train"
    except ImportError:
        opt = optax.sgd(CONFIG["lr"])

        def run(p, x, y):
            def body(carry, _):
                p, s = carry
                loss, g = ga.analytic_loss_and_grads(p, x, y)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            return jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[1]

        run = jax.jit(run)
        source = "own lax.scan of analytic_loss_and_grads + optax.sgd"

    def setup():
        t = time.perf_counter()
        lowered = run.lower(params, x, y)
        t_lower = time.perf_counter() - t
        t = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t
        t = time.perf_counter()
        losses = jax.block_until_ready(compiled(params, x, y))
        t_run = time.perf_counter() - t
        return {"source": source, "steps": steps, "trace_s": t_lower, "compile_s": t_compile, "run_s": t_run,
                "final_loss": float(losses[-1])}

    H.serve(setup, lambda **_: {"seconds": 0.0})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few rounds, few steps")
    ap.add_argument("--n", type=int, default=1999, help="sequence length N (default 1999, the paper's)")
    ap.add_argument("--block-size", type=int, default=None, help="query block size (default: the library's)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 15, quick 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        {"jax": jax_worker, "torch": torch_worker, "floor": floor_worker, "scan": scan_compile_worker}[spec["kind"]](spec)
        return

    rounds = args.rounds or (3 if args.quick else 15)
    steps_per_round = 5 if args.quick else 10
    script = os.path.abspath(__file__)
    n = args.n
    notes = []
    workers = {}
    for v in JAX_VARIANTS:
        workers[v] = H.Worker(script, {"kind": "jax", "variant": v, "n": n, "block_size": args.block_size})
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            workers["torch"] = H.Worker(script, {"kind": "torch", "n": n})
        except ImportError:
            notes.append("torch not importable: PyTorch baseline skipped (pip install '.[bench]')")
    workers["floor"] = H.Worker(script, {"kind": "floor", "n": n})

    print(f"N = {n}; {rounds} alternating rounds of {steps_per_round} steps per variant ...", flush=True)
    answers = H.alternate(workers, rounds, steps=steps_per_round)
    floor_answers = answers.pop("floor")
    floor_parts = {part: H.median([a[part] for a in floor_answers]) for part in ("matmul_s", "exp_s")}
    times = {name: [a["seconds"] for a in ans] for name, ans in answers.items()}
    for w in workers.values():
        w.close()
    scan = H.Worker(script, {"kind": "scan", "n": n, "steps": 1000})
    scan_info = scan.ready
    scan.close()

    ms = {name: 1e3 * H.median(ts) for name, ts in times.items()}
    floor_ms = 1e3 * (floor_parts["matmul_s"] + floor_parts["exp_s"])
    torch_ms = ms.get("torch")
    rows = []
    for name, t in ms.items():
        rows.append([
            name,
            f"{t:.2f}",
            f"{1e3 * min(times[name]):.2f}",
            f"{torch_ms / t:.1f}x" if torch_ms else "-",
            f"{SPEC_FLOOR_MS / t:.2f}",
            f"{floor_ms / t:.2f}",
            f"{workers[name].ready.get('compile_s', float('nan')):.2f}" if name != "torch" else "-",
        ])
    header = ["variant", "median ms/step", "min ms", "speed-up vs torch", "SPEC floor/t", "measured floor/t",
              "compile s"]
    print()
    print(H.table(rows, header))
    print()
    print(f"measured floor on this machine: {floor_ms:.2f} ms = matmul of {workers['floor'].ready['flops'] / 1e6:.0f} "
          f"MFLOP ({1e3 * floor_parts['matmul_s']:.2f} ms, {workers['floor'].ready['flops'] / floor_parts['matmul_s'] / 1e9:.0f} "
          f"GFLOP/s) + exp of {workers['floor'].ready['exp_count'] / 1e6:.1f} M numbers ({1e3 * floor_parts['exp_s']:.2f} ms, "
          f"{workers['floor'].ready['exp_count'] / floor_parts['exp_s'] / 1e9:.2f} G/s); SPEC §4 floor ~{SPEC_FLOOR_MS} ms")
    print(f"1000-step training scan ({scan_info['source']}): trace {scan_info['trace_s']:.2f} s, "
          f"compile {scan_info['compile_s']:.2f} s, run {scan_info['run_s']:.2f} s")
    for note in notes:
        print("note:", note)

    payload = {
        "config": dict(CONFIG, n=n, causal=True, dtype="float32", block_size=args.block_size),
        "rounds": rounds, "steps_per_round": steps_per_round,
        "ms_per_step_median": ms, "ms_per_step_all": {k: [1e3 * t for t in v] for k, v in times.items()},
        "speedup_vs_torch": {k: torch_ms / t for k, t in ms.items()} if torch_ms else None,
        "floor": {"spec_ms": SPEC_FLOOR_MS, "measured_ms": floor_ms, "measured_matmul_ms": 1e3 * floor_parts["matmul_s"],
                  "measured_exp_ms": 1e3 * floor_parts["exp_s"], **workers["floor"].ready},
        "fraction_of_floor": {k: {"spec": SPEC_FLOOR_MS / t, "measured": floor_ms / t} for k, t in ms.items()},
        "compile_s": {k: w.ready.get("compile_s") for k, w in workers.items() if k in JAX_VARIANTS},
        "torch": workers["torch"].ready if "torch" in workers else None,
        "scan_1000_steps": scan_info,
        "notes": notes,
        "machine": H.machine(),
    }
    print("wrote", H.write_json("step_time.json", payload))


if __name__ == "__main__":
    main()
