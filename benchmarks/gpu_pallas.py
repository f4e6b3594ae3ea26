"""The fused Pallas kernels on an accelerator: correctness, then the step time of every gradient path per seed.

One prepared run for a GPU (it runs anywhere; off a GPU the kernels run in Pallas interpret mode,
which is only good for checking that the script works):

1. check: at N = 1999 with the paper's head (d_in 20, d_k 10, d_v 15, C 8, causal, float32 data
   and parameters at init scale 0.1), the loss and gradients of every path against the float64
   dense laws (gradattn.dense_loss_and_grads, computed on the CPU under x64). The error is
   max |a - ref| / max |ref| per gradient (and for the loss); the run fails (exit status 1, after
   writing its JSON) if the default Pallas path (float32 dots) is off by 1e-4 or more.
2. rates: this device's dense matmul rate (4096^3, float32 at HIGHEST precision, at DEFAULT
   precision (TF32 on a recent NVIDIA GPU), bfloat16 in with float32 out) and its memory bandwidth
   (an elementwise x * 2 over 256 MB: read + write).
3. timing: for each path and each number of seeds S (1, 64, 256, 1000), one jitted call that runs
   ``--steps`` full-batch SGD steps (lr 0.01) of every seed (a ``lax.scan`` over steps, vmapped
   over seeds, each seed with its own sequence and initial parameters). Reported: compile seconds,
   median wall seconds per call over ``--reps`` calls, microseconds per seed-step. A path that
   fails (e.g. out of memory at 1000 seeds) is recorded with its error and the run goes on.
   For the Pallas paths also: FLOP/s and bytes/s achieved, against the rates of step 2 (see
   :func:`pallas_cost` for what is counted).
4. tiles: the Pallas float32 path at 64 seeds for a few (block_q, block_k).

Paths: pallas_float32 / pallas_tf32 / pallas_bfloat16 (gradattn.grads.pallas.pallas_loss_and_grads at
each dot precision), blocked (gradattn.blocked_loss_and_grads), dense (gradattn.dense_loss_and_grads,
the laws on whole N x N matrices), autodiff (jax.value_and_grad(gradattn.dense_loss)).

    python benchmarks/gpu_pallas.py                       # on a GPU: about 5 minutes
    python benchmarks/gpu_pallas.py --quick               # anywhere: tiny sizes, well under a minute
    python benchmarks/gpu_pallas.py --paths pallas_float32,dense --seeds 1,1000

Writes <out-dir>/gpu_pallas.json after every measurement, so a run cut short keeps what it
measured; ``--budget-s`` skips (and records as skipped) the measurements that would start after
that many seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _harness as H  # noqa: E402

import gradattn as ga  # noqa: E402
from gradattn.grads.pallas import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, _lanes, _tile, pallas_loss_and_grads  # noqa: E402

HEAD, LR, INIT_SCALE, CHECK_TOL = H.HEAD, H.LR, H.INIT_SCALE, H.CHECK_TOL
PATHS = ("pallas_float32", "pallas_tf32", "pallas_bfloat16", "blocked", "dense", "autodiff")
FULL = dict(n=H.N_POSITIONS, seeds=(1, 64, 256, 1000), steps=10, reps=3, tiles=((32, 32), (64, 64), (128, 64), (128, 128)),
            tile_seeds=64, matmul=4096, bandwidth_mb=256, budget_s=480.0)
QUICK = dict(n=40, seeds=(2,), steps=2, reps=1, tiles=((16, 16),), tile_seeds=2, matmul=256,
             bandwidth_mb=4, budget_s=600.0)


def loss_and_grads_of(path: str, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """``(params, x, y) -> (loss, grads)`` for one named path, causal, no weights."""
    if path.startswith("pallas_"):
        return functools.partial(pallas_loss_and_grads, weights=None, causal=True, precision=path[len("pallas_"):],
                                 block_q=block_q, block_k=block_k)
    if path == "blocked":
        return lambda p, x, y: ga.blocked_loss_and_grads(p, x, y, None, True)
    if path == "dense":
        return lambda p, x, y: ga.dense_loss_and_grads(p, x, y, None, True)
    if path == "autodiff":
        return lambda p, x, y: jax.value_and_grad(ga.dense_loss)(p, x, y, None, True)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def data(n: int, seeds: int, seed0: int = 0):
    """Per seed: its own sequence (x (N, d_in) float32, y (N,) int32) and initial parameters."""
    x, y, weights = H.head_data(n, seeds, seed0)
    return ga.HeadParams(*weights), x, y


def check(n: int, paths) -> dict:
    """Every path's loss and gradients at one seed against the float64 dense laws (on the CPU)."""
    params, x, y = jax.tree.map(lambda a: a[0], data(n, 1))
    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True):
        p64, x64 = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64), (params, x)), cpu)
        ref_loss, ref_grads = jax.jit(lambda p, x, y: ga.dense_loss_and_grads(p, x, y, None, True))(p64, x64, y)
        ref = [np.asarray(ref_loss)] + [np.asarray(g) for g in ref_grads]
    out = {}
    for path in paths:
        try:
            loss, grads = jax.jit(loss_and_grads_of(path))(params, x, y)
            got = [np.asarray(loss)] + [np.asarray(g) for g in grads]
            errs = dict(zip(("loss", *H.PARAMS), (H.rel_err(a, b) for a, b in zip(got, ref))))
            out[path] = {"max_rel_err": max(errs.values()), "rel_err": errs}
        except Exception as err:  # noqa: BLE001 - recorded, and a failing default path fails the run
            out[path] = {"error": _short(err)}
        print(f"check {path:16s} {out[path]}", flush=True)
    default = out.get("pallas_float32", {})
    passed = "max_rel_err" in default and default["max_rel_err"] < CHECK_TOL
    return {"n": n, "reference": "float64 dense laws on the CPU", "tolerance_pallas_float32": CHECK_TOL,
            "paths": out, "passed": bool(passed)}


def _time(fn, *args, reps: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of a jitted ``fn``."""
    compile_s, compiled = H.timed(lambda _: jax.jit(fn).lower(*args).compile())
    jax.block_until_ready(compiled(*args))  # warm: first run allocates
    times = [H.timed(lambda _: compiled(*args), sync=jax.block_until_ready)[0] for _ in range(reps)]
    return compile_s, H.median(times)


def rates(matmul: int, bandwidth_mb: int, reps: int) -> dict:
    """Measured dense matmul FLOP/s (three precisions) and memory bandwidth of the default device."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (matmul, matmul), jnp.float32)
    out = {"matmul_size": matmul}
    for name, fn in (
        ("float32_highest", lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST)),
        ("float32_default", lambda a: jnp.matmul(a, a)),
        ("bfloat16_in_float32_out", lambda a: jnp.matmul(a.astype(jnp.bfloat16), a.astype(jnp.bfloat16),
                                                          preferred_element_type=jnp.float32)),
    ):
        _, t = _time(fn, a, reps=max(reps, 3))
        out[f"flops_{name}"] = 2.0 * matmul**3 / t
    big = jnp.ones((bandwidth_mb * 2**20 // 4,), jnp.float32)
    _, t = _time(lambda b: b * 2.0, big, reps=max(reps, 3))
    out["bandwidth_bytes_per_s"] = 2.0 * big.size * 4 / t
    out["bandwidth_array_mb"] = bandwidth_mb
    print("rates", {k: f"{v:.3g}" for k, v in out.items()}, flush=True)
    return out


def pallas_cost(n: int, block_q: int, block_k: int) -> dict:
    """FLOPs, exponentials and bytes of one causal Pallas pass of one seed, by what the kernels do.

    ``useful_flops``: the six products over the causal half that the laws need, at the head's true
    sizes: N (N + 1) / 2 pairs x 2 x (3 d_k + 3 d_v) (scores, alpha V, b, dS K, dS^T Q, alpha^T U).
    ``executed_flops``: what the kernels run, at padded sizes and tile granularity: per visible
    (query tile, key tile) pair, kernel 1 forms S twice, alpha V, b and dS K; kernel 2 forms S, b,
    dS^T Q' and alpha^T U: 2 bq bk (5 d_k' + 4 d_v') FLOPs, d' = the padded sizes.
    ``tile_bytes``: float32 bytes the kernels load and store if no tile is ever found in a cache
    (K and V tiles read twice by kernel 1; Q', U, lse, c tiles read by kernel 2; outputs once);
    ``compulsory_bytes``: every kernel input and output read or written once. The truth on a GPU
    lies between the two (L2 holds K and V of a seed: 2 x 2048 x 16 x 4 bytes).

    Tiles and padded sizes follow the kernels' own rules (``gradattn.grads.pallas._tile`` and ``_lanes``).
    """
    bq, bk = _tile(block_q, n), _tile(block_k, n)
    n_pad = -(-n // max(bq, bk)) * max(bq, bk)
    dk, dv, c = _lanes(HEAD["d_k"]), _lanes(HEAD["d_v"]), _lanes(HEAD["n_classes"])
    # Visible (query tile, key tile) pairs in each kernel's loops.
    pairs1 = sum(min(-(-((i + 1) * bq) // bk), -(-n // bk)) for i in range(n_pad // bq))
    pairs2 = sum(max(0, -(-n // bq) - (j * bk) // bq) for j in range(n_pad // bk))
    executed = 2.0 * bq * bk * (pairs1 * (3 * dk + 2 * dv) + pairs2 * (2 * dk + 2 * dv))
    useful = n * (n + 1) / 2 * 2 * (3 * HEAD["d_k"] + 3 * HEAD["d_v"])
    exps = bq * bk * (2 * pairs1 + pairs2)
    row_io = n_pad * (dk + dk + dv + dv + c + 2 + 1 + 1 + 1 + 1 + dk + dk + dv) * 4  # q,dq,g,u,e,y,w,lse,c,ce,k,dk,v,dv
    tile_bytes = (2 * pairs1 * bk * (dk + dv) + pairs2 * bq * (dk + dv + 2)) * 4 + row_io
    return {"useful_flops": useful, "executed_flops": executed, "exps": exps, "tile_bytes": float(tile_bytes),
            "compulsory_bytes": float(row_io), "block_q": bq, "block_k": bk, "n_padded": n_pad}


def step_fn(path: str, steps: int, **tiles):
    """All seeds: ``steps`` SGD steps each, as one vmapped scan; returns final params and loss curves."""
    lag = loss_and_grads_of(path, **tiles)

    def one_seed(params, x, y):
        def body(p, _):
            loss, grads = lag(p, x, y)
            return jax.tree.map(lambda w, g: w - LR * g, p, grads), loss

        return jax.lax.scan(body, params, None, length=steps)

    return jax.vmap(one_seed)


def time_path(path: str, n: int, seeds: int, steps: int, reps: int, rate: dict, **tiles) -> dict:
    row = {"path": path, "n": n, "seeds": seeds, "steps": steps, **tiles}
    try:
        params, x, y = data(n, seeds)
        compile_s, t = _time(step_fn(path, steps, **tiles), params, x, y, reps=reps)
        per = t / (seeds * steps)
        row.update(compile_s=compile_s, s_per_call=t, us_per_seed_step=per * 1e6)
        if path.startswith("pallas_"):
            cost = pallas_cost(n, tiles.get("block_q", DEFAULT_BLOCK_Q), tiles.get("block_k", DEFAULT_BLOCK_K))
            row.update(cost)
            row["useful_flops_per_s"] = cost["useful_flops"] / per
            row["executed_flops_per_s"] = cost["executed_flops"] / per
            row["executed_vs_f32_highest"] = row["executed_flops_per_s"] / rate["flops_float32_highest"]
            row["tile_bytes_per_s"] = cost["tile_bytes"] / per
            row["tile_bytes_vs_bandwidth"] = row["tile_bytes_per_s"] / rate["bandwidth_bytes_per_s"]
            row["compulsory_bytes_vs_bandwidth"] = cost["compulsory_bytes"] / per / rate["bandwidth_bytes_per_s"]
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at many seeds: recorded, the run goes on
        row["error"] = _short(err)
        traceback.print_exc()
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
    print("time", shown, flush=True)
    return row


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:400]}"


def machine() -> dict:
    """The harness's machine facts of this process's backend, with the Pallas mode and, under the
    names and meanings this file's results have always used, the backend, the jax version and the
    OS as ``platform`` (the harness's ``platform``, the device platform, is ``backend`` here)."""
    m = H.machine(H.local_backend())
    return {**m, "backend": m["jax_backend"], "jax": m["versions"]["jax"], "platform": m["os"],
            "pallas_mode": "compiled (Triton)" if m["jax_backend"] == "gpu" else "interpret"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs (any backend)")
    ap.add_argument("--n", type=int, help=f"sequence length (default {FULL['n']}; quick {QUICK['n']})")
    ap.add_argument("--seeds", help="comma-separated seed counts (default 1,64,256,1000; quick 2)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)}")
    ap.add_argument("--steps", type=int, help="SGD steps per timed call (default 10; quick 2)")
    ap.add_argument("--reps", type=int, help="timed calls per measurement, median taken (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, help="skip measurements that would start after this many seconds")
    H.add_out_dir(ap)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("n", "steps", "reps", "budget_s"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.seeds:
        cfg["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        loss_and_grads_of(p)  # an unknown name fails here, before anything runs

    start = time.perf_counter()
    result = {"machine": machine(), "config": {**cfg, "paths": paths, "head": HEAD, "lr": LR, "init_scale": INIT_SCALE},
              "timing": [], "tiles": [], "skipped": []}
    print(result["machine"], flush=True)
    out = lambda: H.write_json(os.path.join(args.out_dir, "gpu_pallas.json"), result)  # noqa: E731

    result["check"] = check(cfg["n"], paths)
    out()
    result["rates"] = rate = rates(cfg["matmul"], cfg["bandwidth_mb"], cfg["reps"])
    out()
    over = lambda: time.perf_counter() - start > cfg["budget_s"]  # noqa: E731
    for seeds in cfg["seeds"]:  # every path at one seed count before the next: a cut run still compares paths
        for path in paths:
            if over():
                result["skipped"].append({"path": path, "seeds": seeds, "why": "time budget"})
                continue
            result["timing"].append(time_path(path, cfg["n"], seeds, cfg["steps"], cfg["reps"], rate))
            out()
    if "pallas_float32" in paths:
        for bq, bk in cfg["tiles"]:
            if over():
                result["skipped"].append({"path": "pallas_float32", "tiles": [bq, bk], "why": "time budget"})
                continue
            result["tiles"].append(time_path("pallas_float32", cfg["n"], cfg["tile_seeds"], cfg["steps"], cfg["reps"],
                                             rate, block_q=bq, block_k=bk))
            out()
    result["wall_s"] = time.perf_counter() - start
    result["machine"] = machine()  # again at the end: the load average over the run, the end time
    path = out()
    print(f"wrote {path} in {result['wall_s']:.0f} s; check {'passed' if result['check']['passed'] else 'FAILED'}",
          flush=True)
    return 0 if result["check"]["passed"] else 1


if __name__ == "__main__":
    H.run_main(main)
