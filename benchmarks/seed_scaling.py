"""Time per seed-step when many seeds train at once: jit(vmap(step)) over 1, 16 and 256 seeds.

At a short sequence (N = 127, the paper's head otherwise: d_in = 20, d_k = 10, d_v = 15, C = 8,
causal, float32), each seed has its own parameters and its own sequence; one call advances every
seed by one SGD step (loss + gradients from gradattn.analytic_loss_and_grads + update). Each seed
count runs in its own process, timed in alternating rounds; the figure is the median time per call
divided by the number of seeds. Target (issue 4): 256 seeds cost no more per seed-step than 16.

    python benchmarks/seed_scaling.py            # ~1 minute
    python benchmarks/seed_scaling.py --quick    # smoke run

Writes benchmarks/results/seed_scaling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


def worker(spec):
    import jax
    import jax.numpy as jnp

    import gradattn as ga

    n, seeds = spec["n"], spec["seeds"]
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    params = jax.vmap(lambda k: ga.init_head(k, 20, 10, 15, 8))(keys)
    xs = jax.random.normal(jax.random.PRNGKey(1), (seeds, n, 20), jnp.float32)
    ys = jax.random.randint(jax.random.PRNGKey(2), (seeds, n), 0, 8)
    grad_source = {"analytic": ga.analytic_loss_and_grads, "dense": ga.dense_loss_and_grads,
                   "autodiff": jax.value_and_grad(ga.dense_loss)}[spec["grad_source"]]

    def step(p, x, y):
        loss, g = grad_source(p, x, y)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), loss

    many = jax.jit(jax.vmap(step))
    state = {}

    def setup():
        t = time.perf_counter()
        state["f"] = many.lower(params, xs, ys).compile()
        compile_s = time.perf_counter() - t
        state["p"], _ = state["f"](params, xs, ys)
        jax.block_until_ready(state["p"])
        return {"compile_s": compile_s}

    def timed(calls):
        f, p = state["f"], state["p"]
        t = time.perf_counter()
        for _ in range(calls):
            p, loss = f(p, xs, ys)
        jax.block_until_ready(p)
        state["p"] = p
        return {"seconds": (time.perf_counter() - t) / calls}

    H.serve(setup, timed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few rounds")
    ap.add_argument("--n", type=int, default=127, help="sequence length (default 127)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 16, 256], help="seed counts (default 1 16 256)")
    ap.add_argument("--grad-source", default="analytic", choices=["analytic", "dense", "autodiff"])
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 9, quick 3)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    rounds = args.rounds or (3 if args.quick else 9)
    script = os.path.abspath(__file__)
    workers = {s: H.Worker(script, {"n": args.n, "seeds": s, "grad_source": args.grad_source}) for s in args.seeds}
    # About the same work per request for every seed count: ~256 seed-steps (at least 2 calls).
    answers = {}
    names = list(workers)
    for r in range(rounds):
        for s in names[r % len(names):] + names[: r % len(names)]:
            answers.setdefault(s, []).append(workers[s].ask(calls=max(2, 256 // s))["seconds"])
    for w in workers.values():
        w.close()

    per_call = {s: H.median(ts) for s, ts in answers.items()}
    per_seed_step_us = {s: 1e6 * t / s for s, t in per_call.items()}
    rows = [[s, f"{1e3 * per_call[s]:.3f}", f"{per_seed_step_us[s]:.1f}", f"{workers[s].ready['compile_s']:.1f}"]
            for s in args.seeds]
    print(f"N = {args.n}, grad source {args.grad_source}, {rounds} alternating rounds\n")
    print(H.table(rows, ["seeds", "ms per call", "us per seed-step", "compile s"]))
    verdict = None
    if 16 in per_seed_step_us and 256 in per_seed_step_us:
        ratio = per_seed_step_us[256] / per_seed_step_us[16]
        verdict = ratio <= 1.0
        print(f"\n256 seeds / 16 seeds, per seed-step: {ratio:.2f} ({'met' if verdict else 'NOT met'}: target <= 1)")
    payload = {"n": args.n, "grad_source": args.grad_source, "rounds": rounds,
               "ms_per_call_median": {str(s): 1e3 * t for s, t in per_call.items()},
               "us_per_seed_step": {str(s): t for s, t in per_seed_step_us.items()},
               "all_seconds_per_call": {str(s): v for s, v in answers.items()},
               "compile_s": {str(s): w.ready["compile_s"] for s, w in workers.items()},
               "target_met_256_le_16": verdict, "machine": H.machine()}
    print("wrote", H.write_json("seed_scaling.json", payload))


if __name__ == "__main__":
    main()
