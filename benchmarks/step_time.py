"""Time one training step of the paper's head: the library's gradient paths against the strongest PyTorch peers.

One step = loss + gradients + an SGD update (lr 0.01) at N = 1999, d_in = 20, d_k = 10, d_v = 15,
C = 8, causal, float32, full batch. Every variant runs in its own process on the same data and the
same initial parameters, and is timed in alternating rounds (medians over rounds):

  auto                 gradattn.make_step(gradattn.sgd(lr)): the library's default path for the backend
  blocked              make_step(..., grad_source="blocked"): the fused blocked pass of the laws
  loss_fn_vjp          make_step with jax.value_and_grad(gradattn.loss_fn): the same pass behind a custom VJP
  dense_laws           make_step(..., grad_source="dense"): the laws on whole N x N matrices
  autodiff             make_step(..., grad_source="autodiff"): XLA's reverse mode of the dense loss
  torch_eager          PyTorch eager autograd of the same model (explicit N x N softmax) + torch.optim.SGD
  torch_sdpa           the same with torch's fused scaled_dot_product_attention (q, k, v zero-padded to a
                       head size of 16 as the fused kernel needs equal sizes; scale 1/sqrt(d_k); is_causal)
  torch_compile_eager  torch.compile of torch_eager's loss (forward and backward compiled by inductor)
  torch_compile_sdpa   torch.compile of torch_sdpa's loss

Before any timing, each variant's loss and gradients at the initial parameters are compared with
the library's float64 reference (gradattn.dense_loss_and_grads under x64); a relative error of
1e-4 or more (max |a - ref| / max |ref|, per gradient) stops the benchmark with exit status 1. The
JAX variants are checked through the very step function that is timed (an optimiser that records
the gradients it is given).

Figures: ms per jitted call (dispatch included), the ratio of the fastest PyTorch variant's time to
each variant's, and the step time inside a 1000-step training ``lax.scan`` (gradattn.train, the
library's default path), the figure to compare with this machine's floor: one dense f32 matmul with
the step's FLOPs (the six N x N x d products over the causal half: N^2 (3 d_k + 3 d_v) FLOP) plus
jnp.exp of N^2 / 2 numbers, both measured here.

    python benchmarks/step_time.py                 # ~3 minutes on a 2-core CPU (torch.compile: ~1 min)
    python benchmarks/step_time.py --quick         # smoke run
    python benchmarks/step_time.py --no-torch-compile --platform gpu

Writes <out-dir>/step_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

CONFIG = dict(H.HEAD, lr=H.LR, init_scale=H.INIT_SCALE)
JAX_VARIANTS = ("auto", "blocked", "loss_fn_vjp", "dense_laws", "autodiff")
TORCH_VARIANTS = ("torch_eager", "torch_sdpa", "torch_compile_eager", "torch_compile_sdpa")
PARAMS = H.PARAMS
CHECK_TOL = H.CHECK_TOL
TARGET_VS_TORCH = 3.0  # the training step at least this much faster than the fastest PyTorch variant
TARGET_FLOOR = 0.8  # the scan at this fraction of the measured floor or more


def _check_payload(loss, grads) -> dict:
    import numpy as np

    return {"loss": float(loss), "grads": {k: np.asarray(g, np.float64).tolist() for k, g in zip(PARAMS, grads)}}


# ----------------------------------------------------------------------------------------------- workers


def reference_worker(spec):
    """The library's loss and gradients at the initial parameters, in float64."""
    import jax
    import jax.numpy as jnp

    import gradattn as ga

    x, y, w = H.head_data(spec["n"])
    with jax.enable_x64(True):
        params = ga.HeadParams(*(jnp.asarray(a, jnp.float64) for a in w))
        loss, g = ga.dense_loss_and_grads(params, jnp.asarray(x, jnp.float64), jnp.asarray(y))
        out = _check_payload(loss, g)
    H.serve(lambda: out, lambda **_: {})


def _jax_grad_source(variant: str, block_size):
    import functools

    import jax

    import gradattn as ga

    if variant == "loss_fn_vjp":
        kw = {} if block_size is None else {"block_size": block_size}
        return lambda p, x, y, w, c: jax.value_and_grad(ga.loss_fn)(p, x, y, w, c, **kw)
    if block_size is not None and variant == "blocked":
        return functools.partial(ga.blocked_loss_and_grads, block_size=block_size)
    return {"auto": "auto", "blocked": "blocked", "dense_laws": "dense", "autodiff": "autodiff"}[variant]


def _recording_optimizer():
    """An optax transformation that stores the gradients it is given in its state and updates nothing."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )


def jax_worker(spec):
    import jax
    import jax.numpy as jnp

    import gradattn as ga

    x_np, y_np, w_np = H.head_data(spec["n"])
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = ga.HeadParams(*map(jnp.asarray, w_np))
    source = _jax_grad_source(spec["variant"], spec.get("block_size"))
    opt = ga.sgd(CONFIG["lr"])
    step = jax.jit(ga.make_step(opt, grad_source=source))
    state = {}

    def setup():
        recorder = _recording_optimizer()
        s, metrics = jax.jit(ga.make_step(recorder, grad_source=source))(ga.init_state(params, recorder), x, y)
        check = _check_payload(metrics["loss"], s.opt_state)
        s0 = ga.init_state(params, opt)
        compile_s, compiled = H.timed(lambda _: step.lower(s0, x, y).compile())
        s1, _ = compiled(s0, x, y)
        jax.block_until_ready(s1)
        state.update(f=compiled, s=s1)
        return {"compile_s": compile_s, "check": check, "device": str(jax.devices()[0]),
                "attends_through_output": ga.grads.blocked.attends_through_output(params)}

    def timed(steps):
        f = state["f"]
        seconds, state["s"] = H.timed(lambda s: f(s, x, y)[0], steps, state["s"], jax.block_until_ready)
        return {"seconds": seconds}

    H.serve(setup, timed)


def torch_worker(spec):
    import torch
    from torch.nn.attention import sdpa_kernel

    device = torch.device(spec["torch_device"])
    sync = H.torch_setup(device)
    variant = spec["variant"]
    fused = variant.endswith("sdpa")
    x_np, y_np, w_np = H.head_data(spec["n"])
    x = torch.from_numpy(x_np).to(device)
    y = torch.from_numpy(y_np).long().to(device)
    ws = [torch.from_numpy(w).to(device).requires_grad_() for w in w_np]
    future = None if fused else H.causal_future(spec["n"], device)
    backends = H.sdpa_backends(device)

    def loss_fn(*weights):
        return H.torch_loss(x, y, weights, future)

    if variant.startswith("torch_compile"):
        loss_fn = torch.compile(loss_fn)
    opt = torch.optim.SGD(ws, lr=CONFIG["lr"])

    def step():
        with sdpa_kernel(backends):
            loss = loss_fn(*ws)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss

    def first_step(_):
        with sdpa_kernel(backends):
            loss = loss_fn(*ws)
        loss.backward()
        return loss

    def setup():
        first_s, loss = H.timed(first_step, sync=lambda _: sync())
        check = _check_payload(loss.item(), [w.grad.detach().cpu().numpy() for w in ws])
        for w in ws:
            w.grad = None
        for _ in range(3):
            step()
        sync()
        return {"compile_s": first_s if variant.startswith("torch_compile") else None, "check": check,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                "sdpa_backends": [b.name for b in backends] if fused else None}

    def timed(steps):
        return {"seconds": H.timed(lambda _: step(), steps, sync=lambda _: sync())[0]}

    H.serve(setup, timed)


def floor_worker(spec):
    """This machine's floor: a dense f32 matmul of the step's FLOPs, plus exp of N^2/2 numbers."""
    import jax
    import jax.numpy as jnp

    n = spec["n"]
    flops = n * n * (3 * CONFIG["d_k"] + 3 * CONFIG["d_v"])  # 2 * (N^2 / 2) * (3 d_k + 3 d_v)
    m = round((flops / 2) ** (1 / 3))  # a square matmul with the step's FLOPs
    if jax.default_backend() != "cpu":
        m = max(m, 4096)  # an accelerator reaches its rate only on a larger product; the rate is rescaled below
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
    e = jax.random.normal(jax.random.key(1), (n * n // 2,), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    exp = jax.jit(jnp.exp)

    def setup():
        jax.block_until_ready((matmul(a), exp(e)))
        return {"flops": 2 * m ** 3, "step_flops": flops, "matmul_side": m, "exp_count": n * n // 2}

    def timed(steps):
        t_mm = H.timed(lambda _: matmul(a), steps, sync=jax.block_until_ready)[0]
        t_mm *= flops / (2 * m ** 3)  # the step's FLOPs at the measured rate
        t_exp = H.timed(lambda _: exp(e), steps, sync=jax.block_until_ready)[0]
        return {"seconds": t_mm + t_exp, "matmul_s": t_mm, "exp_s": t_exp}

    H.serve(setup, timed)


def scan_worker(spec):
    """A ``steps``-step training scan (gradattn.train, default path): trace, compile, then timed runs."""
    import jax
    import jax.numpy as jnp

    import gradattn as ga

    x_np, y_np, w_np = H.head_data(spec["n"])
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = ga.HeadParams(*map(jnp.asarray, w_np))
    steps = spec["steps"]
    run = jax.jit(lambda p, x, y: ga.train(p, x, y, ga.sgd(CONFIG["lr"]), steps)[1]["loss"])
    state = {}

    def setup():
        trace_s, lowered = H.timed(lambda _: run.lower(params, x, y))
        compile_s, state["f"] = H.timed(lambda _: lowered.compile())
        losses = jax.block_until_ready(state["f"](params, x, y))
        return {"steps": steps, "trace_s": trace_s, "compile_s": compile_s, "first_loss": float(losses[0]),
                "final_loss": float(losses[-1])}

    def timed():
        return {"seconds": H.timed(lambda _: state["f"](params, x, y), sync=jax.block_until_ready)[0]}

    H.serve(setup, timed)


# ----------------------------------------------------------------------------------------------- parent


def _check(name: str, got: dict, ref: dict) -> dict:
    errs = {"loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"])}
    errs.update({k: H.rel_err(got["grads"][k], ref["grads"][k]) for k in PARAMS})
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 3 steps, a 100-step scan")
    ap.add_argument("--n", type=int, default=H.N_POSITIONS, help=f"sequence length N (default {H.N_POSITIONS}, the paper's)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="query block size for blocked and loss_fn_vjp (default: the library's)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 15; quick 3)")
    ap.add_argument("--scan-rounds", type=int, default=None, help="timed runs of the training scan (default 5; quick 1)")
    ap.add_argument("--no-torch", action="store_true", help="leave out every PyTorch variant (named in the output)")
    ap.add_argument("--no-torch-compile", action="store_true",
                    help="leave out the torch.compile variants (named in the output)")
    H.add_common_args(ap)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        {"reference": reference_worker, "jax": jax_worker, "torch": torch_worker, "floor": floor_worker,
         "scan": scan_worker}[spec["kind"]](spec)
        return

    rounds = args.rounds or (3 if args.quick else 15)
    steps_per_round = 3 if args.quick else 10
    scan_rounds = args.scan_rounds or (1 if args.quick else 5)
    scan_steps = 100 if args.quick else 1000
    n = args.n
    script = os.path.abspath(__file__)
    env = H.worker_env(args.platform)
    backend = H.probe_backend(env)
    torch_device = H.torch_device(backend)
    left_out = {}
    torch_variants = list(TORCH_VARIANTS)
    if args.no_torch:
        left_out.update({v: "--no-torch" for v in TORCH_VARIANTS})
        torch_variants = []
    elif args.no_torch_compile:
        left_out.update({v: "--no-torch-compile" for v in TORCH_VARIANTS if "compile" in v})
        torch_variants = [v for v in TORCH_VARIANTS if "compile" not in v]
    print(f"backend {backend['jax_backend']} ({backend['device_kind']}); torch on {torch_device if torch_variants else '-'}",
          flush=True)

    specs = {"reference": {"kind": "reference", "n": n}}
    specs.update({v: {"kind": "jax", "variant": v, "n": n, "block_size": args.block_size} for v in JAX_VARIANTS})
    specs.update({v: {"kind": "torch", "variant": v, "n": n, "torch_device": torch_device} for v in torch_variants})
    specs["floor"] = {"kind": "floor", "n": n}
    print(f"starting {len(specs)} workers (compiling; torch.compile takes a while) ...", flush=True)
    workers = H.start_workers(script, specs, lambda _: env)
    try:
        ref = workers.pop("reference")
        ref.close()
        checks = {name: _check(name, w.ready["check"], ref.ready) for name, w in workers.items() if "check" in w.ready}
        bad = {name: e for name, e in checks.items() if max(e.values()) >= CHECK_TOL}
        print("\ncheck against the library's float64 loss and gradients (relative error):")
        print(H.table([[name] + [f"{e[k]:.1e}" for k in ("loss", *PARAMS)] for name, e in checks.items()],
                      ["variant", "loss", *PARAMS]))
        if bad:
            raise H.BenchmarkError(f"loss or gradients differ from the library's by {CHECK_TOL:g} or more: "
                                   f"{sorted(bad)}; nothing was timed")

        print(f"\nN = {n}; {rounds} alternating rounds of {steps_per_round} steps per variant ...", flush=True)
        answers = H.alternate(workers, rounds, steps=steps_per_round)
        H.close_all(workers)
    except BaseException:
        H.kill_all(workers)
        raise
    floor_answers = answers.pop("floor")
    floor = workers.pop("floor").ready
    floor_parts = {part: H.median([a[part] for a in floor_answers]) for part in ("matmul_s", "exp_s")}
    floor_ms = 1e3 * (floor_parts["matmul_s"] + floor_parts["exp_s"])

    print(f"training scan: {scan_steps} steps, {scan_rounds} timed run(s) ...", flush=True)
    scan = H.start_workers(script, {"scan": {"kind": "scan", "n": n, "steps": scan_steps}}, lambda _: env)["scan"]
    try:
        scan_answers = [scan.ask()["seconds"] for _ in range(scan_rounds)]
        scan.close()
    except BaseException:
        scan.kill()
        raise
    scan_info = scan.ready
    scan_first_err = abs(scan_info["first_loss"] - ref.ready["loss"]) / ref.ready["loss"]
    if scan_first_err >= CHECK_TOL:
        raise H.BenchmarkError(f"the training scan's first loss {scan_info['first_loss']} differs from the library's "
                               f"{ref.ready['loss']} (relative error {scan_first_err:.1e})")
    scan_ms = 1e3 * H.median(scan_answers) / scan_steps

    times = {name: [a["seconds"] for a in ans] for name, ans in answers.items()}
    ms = {name: 1e3 * H.median(ts) for name, ts in times.items()}
    torch_ms = {k: v for k, v in ms.items() if k.startswith("torch")}
    fastest_torch = min(torch_ms, key=torch_ms.get) if torch_ms else None
    base = torch_ms[fastest_torch] if fastest_torch else None
    rows = []
    for name, t in ms.items():
        c = workers[name].ready.get("compile_s")
        rows.append([name, f"{t:.2f}", f"{1e3 * min(times[name]):.2f}", f"{base / t:.2f}x" if base else "-",
                     f"{floor_ms / t:.2f}", "-" if c is None else f"{c:.1f}"])
    rows.append([f"scan ({scan_steps} steps)", f"{scan_ms:.2f}", f"{1e3 * min(scan_answers) / scan_steps:.2f}",
                 f"{base / scan_ms:.2f}x" if base else "-", f"{floor_ms / scan_ms:.2f}", f"{scan_info['compile_s']:.1f}"])
    for name, why in left_out.items():
        rows.append([name, f"left out ({why})", "", "", "", ""])
    header = ["variant", "median ms/step", "min ms", f"vs {fastest_torch or 'torch'}", "floor/t", "compile s"]

    m = H.machine(backend)
    print()
    print(H.table(rows, header))
    print(f"\nper-call rows: one jitted call per step (dispatch included); scan: the {scan_steps}-step "
          f"gradattn.train run / {scan_steps} (trace {scan_info['trace_s']:.2f} s, compile {scan_info['compile_s']:.1f} s)")
    print(f"floor on this machine: {floor_ms:.2f} ms = the step's {floor['step_flops'] / 1e6:.0f} MFLOP at the dense "
          f"f32 matmul rate ({floor['step_flops'] / floor_parts['matmul_s'] / 1e9:.0f} GFLOP/s: "
          f"{1e3 * floor_parts['matmul_s']:.2f} ms) + exp of {floor['exp_count'] / 1e6:.1f} M numbers "
          f"({floor['exp_count'] / floor_parts['exp_s'] / 1e9:.2f} G/s: {1e3 * floor_parts['exp_s']:.2f} ms)")
    # The floor counts the six products at the model's widths; where the blocked pass attends over
    # V W_O (the library's rule, reported by its worker), three of them are C wide instead of d_v
    # (plus 1 for the row sums): its own arithmetic is less.
    through_output = workers["blocked"].ready["attends_through_output"]
    dk = CONFIG["d_k"]
    width = CONFIG["n_classes"] if through_output else CONFIG["d_v"]
    pass_flops = n * n * (3 * dk + 3 * width + 1)
    pass_floor_ms = 1e3 * (floor_parts["matmul_s"] * pass_flops / floor["step_flops"] + floor_parts["exp_s"])
    print(f"the blocked pass's own arithmetic ({'over V W_O, ' if through_output else ''}widths 3 x {dk} + 3 x {width} + 1): "
          f"{pass_flops / 1e6:.0f} MFLOP, floor {pass_floor_ms:.2f} ms at the same rates; scan at "
          f"{pass_floor_ms / scan_ms:.2f} of it")
    targets = None
    if base:
        fastest_jax = min(JAX_VARIANTS, key=ms.get)
        targets = {"step_vs_fastest_torch": {"target": TARGET_VS_TORCH, "variant": "auto", "reached": base / ms["auto"]},
                   "scan_vs_fastest_torch": {"reached": base / scan_ms},
                   "scan_fraction_of_floor": {"target": TARGET_FLOOR, "reached": floor_ms / scan_ms},
                   "fastest_jax_variant": fastest_jax}
        print(f"fastest PyTorch variant: {fastest_torch} ({base:.2f} ms); default step (auto) {base / ms['auto']:.2f}x "
              f"faster (target {TARGET_VS_TORCH}x), scan {base / scan_ms:.2f}x; scan at {floor_ms / scan_ms:.2f} of "
              f"the floor (target {TARGET_FLOOR})")
    print("machine:", H.describe(m))

    payload = {
        "benchmark": "step_time",
        "config": dict(CONFIG, n=n, causal=True, dtype="float32", block_size=args.block_size),
        "quick": args.quick, "rounds": rounds, "steps_per_round": steps_per_round,
        "ms_per_step_median": ms, "ms_per_step_all": {k: [1e3 * t for t in v] for k, v in times.items()},
        "fastest_torch": fastest_torch,
        "speedup_vs_fastest_torch": {k: base / t for k, t in ms.items()} if base else None,
        "left_out": left_out,
        "check": {"tolerance": CHECK_TOL, "reference": "gradattn.dense_loss_and_grads, float64",
                  "relative_errors": checks},
        "scan": {**scan_info, "rounds": scan_rounds, "seconds_all": scan_answers, "ms_per_step_median": scan_ms,
                 "grad_source": "auto"},
        "floor": {"measured_ms": floor_ms, "matmul_ms": 1e3 * floor_parts["matmul_s"],
                  "exp_ms": 1e3 * floor_parts["exp_s"], **floor,
                  "matmul_gflops": floor["step_flops"] / floor_parts["matmul_s"] / 1e9,
                  "exp_per_s": floor["exp_count"] / floor_parts["exp_s"]},
        "fraction_of_floor": {**{k: floor_ms / t for k, t in ms.items()}, "scan": floor_ms / scan_ms},
        "pass_floor": {"flops": pass_flops, "measured_ms": pass_floor_ms, "scan_fraction": pass_floor_ms / scan_ms},
        "targets": targets,
        "workers": {k: {kk: vv for kk, vv in w.ready.items() if kk != "check"} for k, w in workers.items()},
        "machine": m,
    }
    print("wrote", H.write_json(os.path.join(args.out_dir, "step_time.json"), payload))


if __name__ == "__main__":
    H.run_main(main)
