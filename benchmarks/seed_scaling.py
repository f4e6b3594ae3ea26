"""Cost per seed-step of many training runs at once: gradattn.sweep against PyTorch SDPA with seeds in its batch.

One seed's work is a short training run of the paper's head (d_in = 20, d_k = 10, d_v = 15, C = 8,
causal, float32, SGD at 0.01, full batch) on random data (x ~ N(0, I), uniform targets) of N
positions: for gradattn, ``fn(key)`` draws the data, initialises the head and runs
``gradattn.train`` (default gradient path) for ``steps`` steps, and ``gradattn.sweep(fn, seeds)``
runs the seeds. For PyTorch, the same training with every seed in the batch dimension of one fused
``scaled_dot_product_attention`` (q, k, v zero-padded to a head size of 16; its fused backward
parallelises over batch x heads, so a batch is its best case), with one loss (the sum of the
seeds' mean losses) and torch.optim.SGD.

Configurations of the library, each in its own process (timed in alternating rounds, medians):

  1dev          all seeds on one device, the sweep's default chunk size (seeds vmapped per call)
  1dev_chunk1   one device, one seed per call (the seeds one after another)
  2dev_chunk1   on a CPU: the cores split into two host devices
                (XLA_FLAGS=--xla_force_host_platform_device_count=2), one seed per device per call

The final losses of ``1dev_chunk1`` and ``2dev_chunk1`` are compared bit for bit (a seed's result
must not depend on the device count). Compile time (the first call, less a timed call) is reported
apart and not counted in the per seed-step figure.

    python benchmarks/seed_scaling.py            # N = 1999 and 127; 1, 2, 8, 64 seeds: ~6 minutes
    python benchmarks/seed_scaling.py --quick    # 1 and 2 seeds at N = 1999, short runs

Writes <out-dir>/seed_scaling.json and prints a table per N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

CONFIGS = {"1dev": (1, None), "1dev_chunk1": (1, 1), "2dev_chunk1": (2, 1)}  # name: (host devices, chunk size)


def jax_worker(spec):
    import jax
    import numpy as np

    import gradattn as ga

    n, seeds, steps = spec["n"], list(range(spec["seeds"])), spec["steps"]
    if spec["devices"] > 1 and len(jax.devices()) != spec["devices"]:
        raise RuntimeError(f"asked for {spec['devices']} devices, JAX sees {len(jax.devices())}")
    opt = ga.sgd(H.LR)

    def fn(key):
        k_x, k_y, k_init = jax.random.split(key, 3)
        x = jax.random.normal(k_x, (n, H.HEAD["d_in"]))
        y = jax.random.randint(k_y, (n,), 0, H.HEAD["n_classes"])
        params = ga.init_head(k_init, **H.HEAD, scale=H.INIT_SCALE)
        return ga.train(params, x, y, opt, steps)[1]["loss"][-1]

    kw = {} if spec["chunk_size"] is None else {"chunk_size": spec["chunk_size"]}

    def call():
        return np.asarray(ga.sweep(fn, seeds, **kw))

    def setup():
        first_s, first = H.timed(lambda _: call())
        again_s, final = H.timed(lambda _: call())
        if not np.array_equal(first, final):
            raise RuntimeError("two sweeps of the same seeds gave different results")
        return {"compile_s": first_s - again_s, "final_losses": final.tolist(), "devices": len(jax.devices()),
                "device_kind": jax.devices()[0].device_kind}

    def timed(runs):
        return {"seconds": H.timed(lambda _: call(), runs)[0]}

    H.serve(setup, timed)


def torch_worker(spec):
    import torch
    from torch.nn.attention import sdpa_kernel

    device = torch.device(spec["torch_device"])
    sync = H.torch_setup(device)
    s, n, steps = spec["seeds"], spec["n"], spec["steps"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s, n, H.HEAD["d_in"], generator=g).to(device)
    y = torch.randint(0, H.HEAD["n_classes"], (s, n), generator=g).to(device)
    init = [H.INIT_SCALE * torch.randn(s, *shape, generator=g) for shape in H.head_shapes()]
    backends = H.sdpa_backends(device)

    def loss_of(*ws):
        with sdpa_kernel(backends):
            # The sum over seeds of each seed's mean loss: each seed's gradient is its own.
            return s * H.torch_loss(x, y, ws)

    def run():
        ws = [w.clone().to(device).requires_grad_() for w in init]
        opt = torch.optim.SGD(ws, lr=H.LR)
        losses = []
        for _ in range(steps):
            loss = loss_of(*ws)
            losses.append(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
        return losses

    def setup():
        run()
        return {"compile_s": None, "threads": torch.get_num_threads(), "device": str(device)}

    def timed(runs):
        return {"seconds": H.timed(lambda _: run(), runs)[0]}

    H.serve(setup, timed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer seeds at the paper's N, short runs, 2 rounds")
    ap.add_argument("--n", type=int, nargs="*", default=[H.N_POSITIONS, 127],
                    help=f"sequence lengths N (default {H.N_POSITIONS} 127)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="seed counts (default 1 2 8 64)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick 2)")
    ap.add_argument("--no-torch", action="store_true", help="leave out PyTorch (named in the output)")
    ap.add_argument("--no-split", action="store_true", help="leave out the two-host-device configuration")
    H.add_common_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (torch_worker if spec["kind"] == "torch" else jax_worker)(spec)
        return

    rounds = args.rounds or (2 if args.quick else 3)
    script = os.path.abspath(__file__)
    base_env = H.worker_env(args.platform)
    backend = H.probe_backend(base_env)
    on_cpu = backend["jax_backend"] == "cpu"
    torch_device = H.torch_device(backend)
    split_env = H.worker_env(args.platform, {"XLA_FLAGS": " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=2"]))})
    left_out = {}
    if args.no_split:
        left_out["2dev_chunk1"] = "--no-split"
    elif not on_cpu:
        left_out["2dev_chunk1"] = f"host devices split the CPU; this run is on {backend['jax_backend']}"
    elif (os.cpu_count() or 1) < 2:
        left_out["2dev_chunk1"] = "one core"
    if args.no_torch:
        left_out["torch_sdpa"] = "--no-torch"
    configs = [c for c in CONFIGS if c not in left_out]

    results = {}
    for n in args.n:
        steps = (5 if args.quick else 20) if n >= 1000 else (20 if args.quick else 200)
        counts = args.seeds or ([1, 2] if args.quick and n >= 1000 else [1, 2, 8, 64])
        target = (160 if n >= 1000 else 3200) // (8 if args.quick else 1)  # seed-steps per request (>= 1 run)
        specs, runs = {}, {}
        for s in counts:
            for c in configs:
                devices, chunk = CONFIGS[c]
                if devices > 1 and s < devices:
                    continue
                specs[(s, c)] = {"kind": "jax", "n": n, "seeds": s, "steps": steps, "devices": devices,
                                 "chunk_size": chunk}
            if "torch_sdpa" not in left_out:
                specs[(s, "torch_sdpa")] = {"kind": "torch", "n": n, "seeds": s, "steps": steps,
                                            "torch_device": torch_device}
        for key in specs:
            runs[key] = max(1, math.ceil(target / (key[0] * steps)))
        print(f"N = {n}: {steps}-step training runs, seeds {counts}; starting {len(specs)} workers ...", flush=True)
        workers = H.start_workers(script, {f"{s}/{c}": spec for (s, c), spec in specs.items()},
                                  lambda name: split_env if name.endswith("2dev_chunk1") else base_env)
        try:
            answers = H.alternate(workers, rounds,
                                  request_of=lambda name, runs=runs: {"runs": runs[(int(name.split("/")[0]), name.split("/")[1])]})
            H.close_all(workers)
        except BaseException:
            H.kill_all(workers)
            raise
        rows, entries = [], {}
        for name, ans in answers.items():
            s, c = int(name.split("/")[0]), name.split("/")[1]
            t = H.median([a["seconds"] for a in ans])
            entries[name] = {"seeds": s, "config": c, "seconds_per_run": t, "us_per_seed_step": 1e6 * t / (s * steps),
                             "seconds_all": [a["seconds"] for a in ans], "runs_per_request": runs[(s, c)],
                             **{k: v for k, v in workers[name].ready.items() if k != "final_losses"}}
        identical = {}
        for s in counts:
            a, b = workers.get(f"{s}/1dev_chunk1"), workers.get(f"{s}/2dev_chunk1")
            if a and b:
                identical[s] = a.ready["final_losses"] == b.ready["final_losses"]
        for s in counts:
            torch_us = entries.get(f"{s}/torch_sdpa", {}).get("us_per_seed_step")
            for c in [*configs, "torch_sdpa"]:
                e = entries.get(f"{s}/{c}")
                if e is None:
                    continue
                rows.append([s, c, f"{1e3 * e['seconds_per_run']:.1f}", f"{e['us_per_seed_step']:.1f}",
                             f"{torch_us / e['us_per_seed_step']:.2f}x" if torch_us else "-",
                             "-" if e.get("compile_s") is None else f"{e['compile_s']:.1f}"])
        print(f"\nN = {n}, {steps} steps per run, {rounds} alternating rounds")
        print(H.table(rows, ["seeds", "config", "ms per run", "us per seed-step", "vs torch_sdpa", "compile s"]))
        split = {}
        for s in counts:
            one = [entries[f"{s}/{c}"]["us_per_seed_step"] for c in ("1dev", "1dev_chunk1") if f"{s}/{c}" in entries]
            two = entries.get(f"{s}/2dev_chunk1")
            if one and two:
                split[s] = {"two_devices_over_best_one_device": two["us_per_seed_step"] / min(one),
                            "identical_results": identical.get(s)}
                print(f"{s} seeds: two host devices take {split[s]['two_devices_over_best_one_device']:.2f} of the best "
                      f"one-device time per seed-step; results identical to one device: {identical.get(s)}")
        results[str(n)] = {"steps": steps, "seed_counts": counts, "entries": entries, "split": split}
        print(flush=True)
    for name, why in left_out.items():
        print(f"left out: {name} ({why})")
    m = H.machine(backend)
    print("machine:", H.describe(m))
    payload = {"benchmark": "seed_scaling", "quick": args.quick, "rounds": rounds,
               "config": {**H.HEAD, "lr": H.LR, "dtype": "float32"},
               "configs": {k: {"host_devices": v[0], "chunk_size": v[1]} for k, v in CONFIGS.items()},
               "results": results, "left_out": left_out, "machine": m}
    print("wrote", H.write_json(os.path.join(args.out_dir, "seed_scaling.json"), payload))


if __name__ == "__main__":
    H.run_main(main)
