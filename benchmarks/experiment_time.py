"""The paper's whole EM-like vs SGD experiment end to end: ``gradattn em-vs-sgd`` against PyTorch.

Wall time from process start to the results file written, each implementation in a fresh process:

  gradattn_cold ``python -m gradattn.cli em-vs-sgd --seeds S --steps K --seq-len T --out ... --no-progress``
               with an empty compilation cache: the first run on a machine, everything compiled
  gradattn     the same command again, a second run: its compiled programs come from the persistent
               compilation cache that the first run filled (the command's default; the numbers are
               the same)
  torch_eager  benchmarks/torch_reference.py: the same protocol as the authors' reference code runs
               it (seeds one after another, eager autograd, the N x N softmax built explicitly)
  torch_sdpa   the same PyTorch protocol with torch's fused scaled_dot_product_attention

Each is run ``--repeats`` times, interleaved (gradattn_cold, gradattn, torch_eager, torch_sdpa,
gradattn_cold, ...; the cache is emptied before each cold run); the figure is the median wall time.
Then two more gradattn runs in-process, with JAX's own compilation events recorded
(jax.monitoring), one with an empty cache and one with the cache it filled, split the library's
time into start-up (interpreter and imports), tracing, compiling (or loading from the cache) and
running. Each run's results file is read back: the final
losses of the two arms are printed beside each other, so a reader can see the same experiment ran.

    python benchmarks/experiment_time.py            # 5 seeds, 1000 steps, T = 2000: ~13 minutes on a
                                                    # quiet 2-core CPU (PyTorch eager alone ~7.5 minutes)
    python benchmarks/experiment_time.py --quick    # 1 seed, 20 steps, T = 200

Writes <out-dir>/experiment_time.json (and each implementation's own results file beside it, under
experiment_time_runs/) and prints a table. A run that exits non-zero stops the benchmark (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

TARGETS = {"torch_eager": 12.0, "torch_sdpa": 2.5}  # gradattn at least this many times faster end to end
COMPILE_TARGET_S = 2.0  # tracing, lowering and compiling (or loading) every program of the run
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s",
}


def phases_worker(spec):
    """Run ``gradattn.cli.main(argv)`` in this process, timing imports and JAX's compile events."""
    t_start = spec["t_spawn_offset"]  # the parent's estimate of interpreter start-up before this line
    t0 = time.perf_counter()
    import jax

    t_jax = time.perf_counter()
    import gradattn.cli as cli

    t_imported = time.perf_counter()
    totals = {name: 0.0 for name in COMPILE_EVENTS.values()}
    counts = {name: 0 for name in COMPILE_EVENTS.values()}

    def listener(event, duration, **_):
        if event in COMPILE_EVENTS:
            totals[COMPILE_EVENTS[event]] += duration
            counts[COMPILE_EVENTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    status = cli.main(spec["argv"])
    t_end = time.perf_counter()
    with open(spec["argv"][spec["argv"].index("--out") + 1]) as f:
        results = json.load(f)
    report = {"status": status, "import_jax_s": t_jax - t0, "import_gradattn_s": t_imported - t_jax,
              "cli_s": t_end - t_imported, "experiment_s": results.get("wall_time_s"), **totals,
              "event_counts": counts, "in_process_s": t_end - t0, "interpreter_start_s": t_start}
    print("PHASES " + json.dumps(report), flush=True)


def check_torch_protocol() -> None:
    """torch_reference.py states the experiment's sizes and rates itself (it may not import the
    library); they must be the library's defaults, or the two sides would not run one experiment."""
    import torch_reference as R

    from gradattn.experiments import EmVsSgdConfig

    config = EmVsSgdConfig()
    task = config.task
    head, rates = config.head, config.rates
    library = {"d_in": task.d_in, "d_k": head.d_k, "d_v": head.d_v, "n_classes": task.n_classes,
               "sgd_lr": rates.sgd_lr, "routing_lr": rates.routing_lr, "value_lr": rates.value_lr,
               "init_scale": head.init_scale, "self_prob": task.self_prob}
    torch_side = {**R.HEAD, "sgd_lr": R.LR, "routing_lr": R.LR, "value_lr": R.EM_VALUE_LR,
                  "init_scale": R.INIT_SCALE, "self_prob": R.SELF_PROB}
    differ = {k: (library[k], torch_side[k]) for k in library if library[k] != torch_side[k]}
    if differ:
        raise H.BenchmarkError(f"torch_reference.py's protocol differs from the library's defaults (library, "
                               f"torch_reference): {differ}; nothing was run")


def _library_argv(args, out: str) -> list[str]:
    return ["em-vs-sgd", "--seeds", str(args.seeds), "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--out", out, "--no-progress"]


def _run(name: str, cmd: list[str], env: dict, out: str) -> dict:
    """Run ``cmd`` to completion; wall time from spawn to exit, and its results file read back."""
    if os.path.exists(out):
        os.unlink(out)
    wall, proc = H.timed(lambda _: subprocess.run(cmd, env=env, capture_output=True, text=True))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise H.BenchmarkError(f"{name} exited with status {proc.returncode}: {' '.join(cmd)}")
    if not os.path.exists(out):
        raise H.BenchmarkError(f"{name} exited 0 but wrote no results file {out}")
    with open(out) as f:
        results = json.load(f)
    for arm in ("sgd", "em"):
        loss = results[arm]["final_loss_mean"]
        if loss is None or not loss == loss:
            raise H.BenchmarkError(f"{name}: the {arm} arm's final loss is not finite ({loss})")
    print(f"  {name:<12} {wall:7.1f} s   SGD {results['sgd']['final_loss_mean']:.4f}  "
          f"EM-like {results['em']['final_loss_mean']:.4f}", flush=True)
    return {"wall_s": wall, "stdout_tail": proc.stdout[-2000:], "results": results}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 20 steps, T = 200")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 5; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="updates per arm (default 1000; quick 20)")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length T (default 2000; quick 200)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each implementation (default 1)")
    ap.add_argument("--no-torch", action="store_true", help="leave out both PyTorch runs (named in the output)")
    ap.add_argument("--no-torch-eager", action="store_true",
                    help="leave out the PyTorch eager run (~4.5 minutes; named in the output)")
    H.add_common_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        phases_worker(json.loads(args.worker))
        return
    from gradattn.experiments import EmVsSgdConfig

    default = EmVsSgdConfig()
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (20 if args.quick else default.steps)
    args.seq_len = args.seq_len or (200 if args.quick else default.task.seq_len)

    env = H.worker_env(args.platform)
    backend = H.probe_backend(env)
    torch_device = H.torch_device(backend)
    runs_dir = os.path.join(args.out_dir, "experiment_time_runs")
    os.makedirs(runs_dir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    cache_dir = os.path.join(runs_dir, "jax_cache")  # the library's runs' compilation cache, emptied for each cold run
    lib_env = {**env, "GRADATTN_CACHE_DIR": cache_dir}
    lib_env.pop("GRADATTN_NO_COMPILATION_CACHE", None)
    cmds = {name: [sys.executable, "-m", "gradattn.cli", *_library_argv(args, os.path.join(runs_dir, f"{name}.json"))]
            for name in ("gradattn_cold", "gradattn")}
    left_out = {}
    for attention in ("eager", "sdpa"):
        name = f"torch_{attention}"
        if args.no_torch or (attention == "eager" and args.no_torch_eager):
            left_out[name] = "--no-torch" if args.no_torch else "--no-torch-eager"
            continue
        cmds[name] = [sys.executable, os.path.join(here, "torch_reference.py"), "--seeds", str(args.seeds),
                      "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--attention", attention,
                      "--device", torch_device, "--out", os.path.join(runs_dir, f"{name}.json")]

    if any(name.startswith("torch") for name in cmds):
        check_torch_protocol()
    print(f"{args.seeds} seed(s) x {args.steps} steps x 2 arms, T = {args.seq_len}; backend {backend['jax_backend']} "
          f"({backend['device_kind']}); {args.repeats} repeat(s)", flush=True)
    runs = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            if name == "gradattn_cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            runs[name].append(_run(name, cmd, lib_env if name.startswith("gradattn") else env, cmd[cmd.index("--out") + 1]))

    # Interpreter start-up alone (python -c pass), to split the library's time into its phases.
    interpreter_s, _ = H.timed(lambda _: subprocess.run([sys.executable, "-c", "pass"], check=True))
    phases = {}
    shutil.rmtree(cache_dir, ignore_errors=True)
    for which in ("cold", "warm"):  # an empty cache, then the cache the cold run filled
        spec = {"argv": _library_argv(args, os.path.join(runs_dir, f"gradattn_phases_{which}.json")),
                "t_spawn_offset": interpreter_s}
        phase_wall, proc = H.timed(lambda _, spec=spec: subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=lib_env,
            capture_output=True, text=True))
        if proc.returncode:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise H.BenchmarkError(f"the in-process gradattn run ({which} cache) exited with status {proc.returncode}")
        ph = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES ")][-1][len("PHASES "):])
        ph["wall_s"] = phase_wall
        # JAX's backend-compile event spans the cache lookup too: a hit's load time is inside compile_s.
        ph["run_s"] = ph["experiment_s"] - ph["trace_s"] - ph["lower_s"] - ph["compile_s"]
        ph["startup_and_imports_s"] = ph["wall_s"] - ph["in_process_s"] + ph["import_jax_s"] + ph["import_gradattn_s"]
        ph["other_s"] = ph["wall_s"] - ph["startup_and_imports_s"] - ph["experiment_s"]
        phases[which] = ph

    wall = {name: H.median([r["wall_s"] for r in rs]) for name, rs in runs.items()}
    lib = wall["gradattn"]
    rows = []
    for name, rs in runs.items():
        r = rs[-1]["results"]
        rows.append([name, f"{wall[name]:.1f}", f"{min(x['wall_s'] for x in rs):.1f}",
                     "1.00x" if name == "gradattn" else f"{wall[name] / lib:.2f}x",
                     f"{wall[name] / wall['gradattn_cold']:.2f}x",
                     f"{r['sgd']['final_loss_mean']:.4f}", f"{r['em']['final_loss_mean']:.4f}",
                     f"{r['em_steps_to_sgd_final']['mean']:.0f}"])
    for name, why in left_out.items():
        rows.append([name, f"left out ({why})", "", "", "", "", "", ""])
    m = H.machine(backend)
    print()
    print(H.table(rows, ["implementation", "median wall s", "min s", "time / gradattn's", "time / gradattn_cold's",
                         "SGD final loss", "EM final loss", "EM steps to SGD final"]))
    for which, ph in phases.items():
        print(f"\nwhere gradattn's time goes ({which} compilation cache; one more run, in-process, {ph['wall_s']:.1f} s "
              f"wall): start-up and imports {ph['startup_and_imports_s']:.1f} s (interpreter "
              f"{ph['interpreter_start_s']:.1f}, jax {ph['import_jax_s']:.1f}, gradattn {ph['import_gradattn_s']:.1f}); "
              f"tracing {ph['trace_s']:.1f} s, lowering {ph['lower_s']:.1f} s, XLA compile or load {ph['compile_s']:.1f} s "
              f"(of it loading from the cache {ph['cache_load_s']:.1f} s); running {ph['run_s']:.1f} s; task set-up, summary "
              f"and writing {ph['other_s']:.1f} s")
    targets = {}
    for name, target in TARGETS.items():
        if name in wall:
            targets[name] = {"target": target, "reached": wall[name] / lib, "reached_cold": wall[name] / wall["gradattn_cold"]}
            print(f"gradattn vs {name}: {wall[name] / lib:.2f}x on a second run, {wall[name] / wall['gradattn_cold']:.2f}x "
                  f"on the first (target {target}x)")
    compile_cold = sum(phases["cold"][k] for k in ("trace_s", "lower_s", "compile_s"))
    compile_warm = sum(phases["warm"][k] for k in ("trace_s", "lower_s", "compile_s"))
    print(f"tracing + lowering + compiling: {compile_cold:.1f} s on the first run, {compile_warm:.1f} s on a second "
          f"(target under {COMPILE_TARGET_S:.0f} s)")
    print("machine:", H.describe(m))
    payload = {
        "benchmark": "experiment_time", "quick": args.quick,
        "config": {"seeds": args.seeds, "steps": args.steps, "seq_len": args.seq_len, "repeats": args.repeats},
        "commands": {name: cmd for name, cmd in cmds.items()},
        "wall_s_median": wall, "wall_s_all": {name: [r["wall_s"] for r in rs] for name, rs in runs.items()},
        "ratio_to_gradattn": {name: t / lib for name, t in wall.items()},
        "results": {name: {k: rs[-1]["results"].get(k) for k in ("sgd", "em", "em_steps_to_sgd_final", "speedup",
                                                                   "timing", "wall_time_s", "n_devices", "chunk_size")}
                    for name, rs in runs.items()},
        "gradattn_phases": phases,
        "compile_s": {"cold": compile_cold, "warm": compile_warm, "target": COMPILE_TARGET_S},
        "left_out": left_out, "targets": targets, "machine": m,
    }
    print("wrote", H.write_json(os.path.join(args.out_dir, "experiment_time.json"), payload))


if __name__ == "__main__":
    H.run_main(main)
