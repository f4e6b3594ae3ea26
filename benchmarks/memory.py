"""Peak memory of one training step against N: the blocked pass against the dense laws.

For each N (default 1999, 4096, 8192, 16384) and each variant, a fresh subprocess builds the
paper's head (d_in = 20, d_k = 10, d_v = 15, C = 8, causal, float32), compiles one jitted step
(loss + gradients + SGD update) and reports

  xla_temp_mb   XLA's compiled memory_analysis(): temporary buffers of the step (no run needed)
  xla_total_mb  temporaries + arguments + outputs
  rss_mb        peak resident memory of the whole process after running the step twice
                (resource.getrusage maxrss: includes the Python + JAX runtime, see base_rss_mb)
  base_rss_mb   peak resident memory of the same process before compiling the step
  device_peak_mb  on an accelerator: the device's peak bytes in use (``Device.memory_stats()``)

Variants: ``blocked`` (gradattn.blocked_loss_and_grads, the CPU default) and ``dense`` (the laws on
whole N x N matrices, gradattn.dense_loss_and_grads). The dense step is only *run* where XLA's
estimate fits in half of this machine's memory; its estimate is always reported. A worker that
fails stops the benchmark with exit status 1.

    python benchmarks/memory.py            # ~2 minutes
    python benchmarks/memory.py --quick    # N = 1999 and 4096 only

Writes <out-dir>/memory.json and prints a table. Target: the N = 16384 blocked step within 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

TARGET_GB = 2.0


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def worker(spec) -> dict:
    import jax
    import jax.numpy as jnp

    import gradattn as ga

    n = spec["n"]
    x_np, y_np, _ = H.head_data(n)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = ga.init_head(jax.random.PRNGKey(0), **H.HEAD, scale=H.INIT_SCALE)
    grad_source = ga.blocked_loss_and_grads if spec["variant"] == "blocked" else ga.dense_loss_and_grads

    def step(p, x, y):
        loss, g = grad_source(p, x, y)
        return jax.tree.map(lambda a, b: a - H.LR * b, p, g), loss

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    compile_s, compiled = H.timed(lambda _: jax.jit(step).lower(params, x, y).compile())
    m = compiled.memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    out = {"n": n, "variant": spec["variant"], "compile_s": compile_s, "xla_temp_mb": m.temp_size_in_bytes / 1e6,
           "xla_total_mb": total / 1e6, "base_rss_mb": base / 1e6, "ran": False}
    if total < spec["run_limit_bytes"]:
        p, loss = compiled(params, x, y)
        step_s, (p, loss) = H.timed(lambda _: compiled(p, x, y), sync=jax.block_until_ready)
        out.update(ran=True, step_s=step_s, loss=float(loss),
                   rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6)
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 1e6
    out["device_kind"] = jax.devices()[0].device_kind
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {H.N_POSITIONS} and 4096 only")
    ap.add_argument("--n", type=int, nargs="*", default=None,
                    help=f"sequence lengths (default {H.N_POSITIONS} 4096 8192 16384)")
    H.add_common_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    ns = args.n or ([H.N_POSITIONS, 4096] if args.quick else [H.N_POSITIONS, 4096, 8192, 16384])
    run_limit = _available_bytes() // 2
    env = H.worker_env(args.platform)
    backend = H.probe_backend(env)
    results = []
    for n in ns:
        for variant in ("blocked", "dense"):
            spec = {"n": n, "variant": variant, "run_limit_bytes": run_limit}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise H.BenchmarkError(f"the N = {n} {variant} worker exited with status {proc.returncode}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  N = {n:>5} {variant:<7} done", flush=True)

    rows = []
    for r in results:
        rows.append([
            r["n"], r["variant"], f"{r['xla_temp_mb']:.1f}", f"{r['xla_total_mb']:.1f}",
            f"{r['rss_mb']:.0f}" if r["ran"] else "not run", f"{r['base_rss_mb']:.0f}",
            f"{r['step_s'] * 1e3:.0f}" if r["ran"] else "-", f"{r['compile_s']:.1f}",
            f"{r['device_peak_mb']:.0f}" if "device_peak_mb" in r else "-",
        ])
    print()
    print(H.table(rows, ["N", "variant", "XLA temp MB", "XLA total MB", "peak RSS MB", "base RSS MB", "step ms",
                         "compile s", "device peak MB"]))
    big = [r for r in results if r.get("variant") == "blocked" and r.get("n") == 16384 and r.get("ran")]
    verdict = None
    if big:
        verdict = big[0]["rss_mb"] / 1e3 <= TARGET_GB
        print(f"\nN = 16384 blocked step: peak RSS {big[0]['rss_mb'] / 1e3:.2f} GB of the whole process, "
              f"XLA buffers {big[0]['xla_total_mb'] / 1e3:.2f} GB: {'within' if verdict else 'OVER'} {TARGET_GB} GB")
    print(f"dense steps are run only where XLA's estimate is below {run_limit / 1e9:.1f} GB (half the available memory)")
    m = H.machine(backend)
    print("machine:", H.describe(m))
    print("wrote", H.write_json(os.path.join(args.out_dir, "memory.json"), {
        "benchmark": "memory", "quick": args.quick, "results": results, "target_gb": TARGET_GB,
        "run_limit_bytes": run_limit, "n16384_within_target": verdict, "machine": m}))


if __name__ == "__main__":
    H.run_main(main)
