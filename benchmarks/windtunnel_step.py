"""One training step of the bijection wind tunnel: gradattn against the authors' own training script,
and against this machine's matmul floor.

    python benchmarks/windtunnel_step.py --authors-script PATH/TO/experiments/paper1_bijection/train.py
    python benchmarks/windtunnel_step.py --quick ...     # one round, short runs (a smoke run)

Two sizes, each at the authors' settings of its row:

* ``small``: V 10, L 9, d_model 64, 4 layers x 4 heads, batch 64 (``gradattn windtunnel-bijection
  --preset small``);
* ``paper``: V 20, L 19, d_model 192, 6 layers x 6 heads, batch 128 (``--preset paper``).

Contenders, each in its own process, timed in alternating rounds (medians):

* ``jax_1``: one seed's wind-tunnel run (:func:`gradattn.experiments.compiled_run` of
  ``windtunnel_bijection``, jit-compiled): K training steps in one ``lax.scan``, each drawing its
  batch inside the step, AdamW with warm-up, cosine decay and clipping, then one held-out sequence
  measured. Seconds per step = the call's wall time / K (the initialisation and the one held-out
  sequence are charged to the steps).
* ``jax_4``: four seeds of the same run vmapped in one call; reported per seed-step.
* ``jax_1_T``: ``jax_1`` at L + 1 pairs, so that its sequences have the authors' length (their
  script feeds ``k1 v1 ... kL vL q``, 2L + 1 tokens, where the production layout has 2L - 1).
* ``authors``: the authors' training script, run as they ship it (``--exp changing``, their
  default vocabulary layout and sampling, only the query supervised), CPU, all cores, its data
  made by its two DataLoader workers. Seconds per step = (wall(K2 steps) - wall(K1 steps)) / (K2 - K1),
  two process runs per round, so that start-up, its evaluations (at step 1 and at the end, on
  ``--n_val 64``) and its checkpoint writes cancel. Nothing of their code is in this repository: pass
  the path of a checkout's ``train.py``; without it this contender is left out and named.

The matmul floor of a size: the step's matmul FLOPs (forward 2 T d^2 (4 + 8) per layer, attention
2 x 2 T^2 d per layer, the output head 2 T d V_out, times the batch; backward twice the forward) at
this machine's dense float32 matmul rate (one square matmul of side 2048 in XLA). The same
contender is not the same program: the authors' model adds a pointer lookup and trains on one
position per sequence, ours on every key position; the FLOPs of both are printed.

Writes ``<out-dir>/windtunnel_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

SIZES = {
    "small": {"V": 10, "L": 9, "d_model": 64, "n_layers": 4, "n_heads": 4, "batch": 64},
    "paper": {"V": 20, "L": 19, "d_model": 192, "n_layers": 6, "n_heads": 6, "batch": 128},
}
TARGETS = {"small_vs_authors": 3.0, "paper_vs_floor": 1.3}
"""The targets: at the small size at least 3x the authors' speed per step; at the paper's size
within 1.3x of the matmul floor."""


def step_flops(size: dict, tokens: int, vocab_out: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) at ``size`` on sequences
    of ``tokens`` tokens: per layer the four attention projections and the 4x-wide feed-forward
    (2 T d^2 (4 + 8)), the scores and the weighted values over all T x T pairs (2 x 2 T^2 d), and
    the output head (2 T d V_out)."""
    d, n_layers = size["d_model"], size["n_layers"]
    forward = n_layers * (24 * tokens * d * d + 4 * tokens * tokens * d) + 2 * tokens * d * vocab_out
    return 3.0 * forward * size["batch"]


# ----------------------------------------------------------------------------------------------- workers


def jax_worker(spec):
    import jax

    from gradattn.experiments import compiled_run
    from gradattn.experiments.windtunnel import WindTunnelConfig, windtunnel_bijection
    from gradattn.sweeps import seed_key
    from gradattn.tasks import BijectionTokens

    size, steps, seeds = spec["size"], spec["steps"], spec["seeds"]
    cfg = WindTunnelConfig(task=BijectionTokens(V=size["V"], L=spec["L"]), d_model=size["d_model"],
                           n_layers=size["n_layers"], n_heads=size["n_heads"], batch=size["batch"], steps=steps,
                           warmup=1, heldout=1)
    run = compiled_run(windtunnel_bijection, cfg)
    keys = jax.numpy.stack([seed_key(s) for s in range(seeds)]) if seeds > 1 else seed_key(0)
    fn = jax.jit(jax.vmap(run) if seeds > 1 else run)

    def call():
        return jax.block_until_ready(fn(keys)["curve"])

    def setup():
        first_s, first = H.timed(lambda _: call())
        again_s, again = H.timed(lambda _: call())
        if not (first == again).all():
            raise RuntimeError("two calls of the same run gave different losses")
        return {"compile_s": first_s - again_s, "tokens": cfg.task.seq_len, "vocab": cfg.task.vocab_size,
                "first_loss": float(again.reshape(-1, steps)[0, 0]), "last_loss": float(again.reshape(-1, steps)[0, -1])}

    def timed():
        return {"seconds": H.timed(lambda _: call())[0]}

    H.serve(setup, timed)


def floor_worker(spec):
    import jax
    import jax.numpy as jnp

    m = spec["side"]
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)

    def setup():
        jax.block_until_ready(matmul(a))
        return {"side": m}

    def timed():
        t = H.timed(lambda _: matmul(a), 5, sync=jax.block_until_ready)[0]
        return {"seconds": t, "gflops": 2 * m ** 3 / t / 1e9}

    H.serve(setup, timed)


def authors_run(script: str, size: dict, steps: int) -> float:
    """Wall seconds of one run of the authors' script for ``steps`` steps at ``size`` (a scratch
    working directory takes its checkpoint and results files)."""
    cmd = [sys.executable, script, "--exp", "changing", "--V", str(size["V"]), "--L", str(size["L"]),
           "--dim", str(size["d_model"]), "--layers", str(size["n_layers"]), "--heads", str(size["n_heads"]),
           "--batch_size", str(size["batch"]), "--max_steps", str(steps), "--eval_every", str(10 ** 9),
           "--n_val", "64"]
    with tempfile.TemporaryDirectory() as cwd:
        t = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
    if done.returncode:
        raise H.BenchmarkError(f"the authors' script failed ({' '.join(cmd)}): {done.stderr[-2000:]}")
    return wall


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one round, short runs")
    ap.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES), help="sizes (default both)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick 1)")
    ap.add_argument("--authors-script", default=None,
                    help="path of the authors' experiments/paper1_bijection/train.py (left out without it)")
    H.add_common_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        {"jax": jax_worker, "floor": floor_worker}[spec["kind"]](spec)
        return
    if args.authors_script is not None and not os.path.isfile(args.authors_script):
        raise H.BenchmarkError(f"--authors-script: no file at {args.authors_script!r}")
    rounds = args.rounds or (1 if args.quick else 3)
    script = os.path.abspath(__file__)
    env = H.worker_env(args.platform)
    backend = H.probe_backend(env)
    left_out = {} if args.authors_script else {"authors": "no --authors-script"}

    floor = H.start_workers(script, {"floor": {"kind": "floor", "side": 1024 if args.quick else 2048}}, lambda _: env)
    results = {}
    try:
        for name in args.sizes:
            size = SIZES[name]
            steps = {"small": 20 if args.quick else 200, "paper": 3 if args.quick else 12}[name]
            a_steps = {"small": (10, 60) if args.quick else (20, 320), "paper": (2, 6) if args.quick else (4, 24)}[name]
            specs = {"jax_1": {"L": size["L"], "seeds": 1}, "jax_4": {"L": size["L"], "seeds": 4},
                     "jax_1_T": {"L": size["L"] + 1, "seeds": 1}}
            print(f"{name}: starting {len(specs)} JAX workers (compiling) ...", flush=True)
            workers = H.start_workers(script, {k: {"kind": "jax", "size": size, "steps": steps, **v}
                                               for k, v in specs.items()}, lambda _: env)
            times = {k: [] for k in [*specs, "authors", "floor"]}
            try:
                for r in range(rounds):
                    order = [*specs, "authors"]
                    order = order[r % len(order):] + order[: r % len(order)]
                    for k in order:
                        if k == "authors":
                            if args.authors_script:
                                w1, w2 = (authors_run(args.authors_script, size, s) for s in a_steps)
                                times[k].append((w2 - w1) / (a_steps[1] - a_steps[0]))
                        else:
                            per = steps * specs[k]["seeds"]
                            times[k].append(workers[k].ask()["seconds"] / per)
                    times["floor"].append(floor["floor"].ask()["gflops"])
                    print(f"  round {r + 1}/{rounds}: " + ", ".join(
                        f"{k} {1e3 * v[-1]:.1f} ms" for k, v in times.items() if v and k != "floor"), flush=True)
                H.close_all(workers)
            except BaseException:
                H.kill_all(workers)
                raise
            med = {k: H.median(v) for k, v in times.items() if v}
            ours_tokens = workers["jax_1"].ready["tokens"]
            vocab = workers["jax_1"].ready["vocab"]
            flops = step_flops(size, ours_tokens, vocab)
            floor_s = flops / (med["floor"] * 1e9)
            results[name] = {
                "size": size, "steps_per_call": steps, "authors_steps": list(a_steps),
                "seconds_per_step": {k: v for k, v in med.items() if k != "floor"},
                "seconds_per_step_all": {k: v for k, v in times.items() if k != "floor"},
                "matmul_gflops": med["floor"], "step_flops": flops, "floor_seconds": floor_s,
                "step_flops_authors_length": step_flops(size, 2 * size["L"] + 1, vocab),
                "workers": {k: w.ready for k, w in workers.items()},
            }
    finally:
        H.kill_all(floor)

    rows = []
    for name, r in results.items():
        s = r["seconds_per_step"]
        a = s.get("authors")
        for k, t in s.items():
            rows.append([name, k, f"{1e3 * t:.2f}", f"{a / t:.2f}x" if a else "-",
                         f"{t / r['floor_seconds']:.2f}" if k.startswith("jax") else "-"])
    print()
    print(H.table(rows, ["size", "contender", "ms per (seed-)step", "vs authors", "t / floor"]))
    verdicts = {}
    if "small" in results and "authors" in results["small"]["seconds_per_step"]:
        s = results["small"]["seconds_per_step"]
        verdicts["small_vs_authors"] = {"ratio": s["authors"] / s["jax_1"], "ratio_4_seeds": s["authors"] / s["jax_4"],
                                        "target": TARGETS["small_vs_authors"]}
    if "paper" in results:
        r = results["paper"]
        verdicts["paper_vs_floor"] = {"ratio": r["seconds_per_step"]["jax_1"] / r["floor_seconds"],
                                      "target": TARGETS["paper_vs_floor"]}
    for name, r in results.items():
        print(f"{name}: {r['step_flops'] / 1e9:.2f} GFLOP per step (ours, T = {r['workers']['jax_1']['tokens']}); "
              f"matmul rate {r['matmul_gflops']:.0f} GFLOP/s; floor {1e3 * r['floor_seconds']:.1f} ms")
    for k, v in verdicts.items():
        print(f"target {k}: {v}")
    for name, why in left_out.items():
        print(f"left out: {name} ({why})")
    m = H.machine(backend)
    print("machine:", H.describe(m))
    payload = {"benchmark": "windtunnel_step", "quick": args.quick, "rounds": rounds, "results": results,
               "targets": verdicts, "left_out": left_out, "authors_script": args.authors_script, "machine": m}
    print("wrote", H.write_json(os.path.join(args.out_dir, "windtunnel_step.json"), payload))


if __name__ == "__main__":
    H.run_main(main)
