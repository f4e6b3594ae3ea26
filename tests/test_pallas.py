"""The fused Pallas kernels equal the dense laws and autodiff (run here in Pallas interpret mode).

Every distinct (N, tiles, causal, dtype) compiles the kernels again (a few seconds each in
interpret mode on a 2-core CPU), so the cases below are few and chosen to cover: N = 1, N below
one tile, N not a multiple of either tile, unequal query and key tiles both ways, causal and not,
position weights, float64 (< 1e-9 against the laws and autodiff) and float32.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cases import problem

import gradattn as ga
from gradattn.grads.blocked import BlockedPass
from gradattn.grads.dense import dense_loss_and_grads
from gradattn.grads.pallas import PRECISIONS, TRITON_MODULE, pallas_loss_and_grads, pallas_pass
from gradattn.head import dense_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    """max |a - b| over all leaves, relative to the largest |b| over all leaves (a leaf that is
    exactly zero, like dL/dW_Q at N = 1, is judged on the scale of the whole gradient)."""
    scale = max(max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b)), 1e-300)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


def reference_pass(params, x, y, weights, causal):
    """loss, CE_i and dL/dQ, dL/dK, dL/dV, dL/dW_O by autodiff of the head written out here."""
    n, d_k = x.shape[0], params.w_q.shape[1]
    w = jnp.ones(n, x.dtype) if weights is None else weights
    w = w / jnp.sum(w)

    def loss(q, k, v, w_o):
        s = q @ k.T / jnp.sqrt(jnp.asarray(d_k, x.dtype))
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
        logp = jax.nn.log_softmax(jax.nn.softmax(s, axis=-1) @ v @ w_o, axis=-1)
        ce = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        return jnp.sum(w * ce), ce

    (value, ce), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        x @ params.w_q, x @ params.w_k, x @ params.w_v, params.w_o)
    return BlockedPass(value, ce, *grads)


# (n, block_q, block_k, causal, weighted): N = 1; N < one tile (not causal); N = 33 and 100, not
# multiples of 16 or 32; block_q < block_k and block_q > block_k (padding to the larger tile, key
# tiles wholly in the padding, query tiles that see part of a key tile).
CASES = [
    (1, 16, 16, True, False),
    (7, 16, 32, False, True),
    (33, 16, 32, True, True),
    (100, 32, 16, True, False),
]


@functools.partial(jax.jit, static_argnums=(4,))
def references(params, x, y, w, causal):
    """The autodiff pass above, the dense laws and autodiff of the library's dense loss, in one program."""
    return (reference_pass(params, x, y, w, causal), dense_loss_and_grads(params, x, y, w, causal),
            jax.value_and_grad(dense_loss)(params, x, y, w, causal))


@pytest.mark.parametrize("n, block_q, block_k, causal, weighted", CASES)
def test_pass_and_grads_equal_laws_and_autodiff_float64(n, block_q, block_k, causal, weighted):
    with jax.enable_x64(True):
        params, x, y, w = problem(n, weighted=weighted, seed=n)
        by_autodiff, by_laws, by_dense_autodiff = references(params, x, y, w, causal)
        got = pallas_pass(params, x, y, w, causal, block_q=block_q, block_k=block_k)
        assert isinstance(got, BlockedPass)
        assert got.dq.shape == (n, 3) and got.dk.shape == (n, 3) and got.dv.shape == (n, 4)
        assert got.dw_o.shape == (4, 6) and got.token_losses.shape == (n,)
        assert all(a.dtype == jnp.float64 for a in got)
        assert rel_err(got, by_autodiff) < 1e-9

        loss, grads = pallas_loss_and_grads(params, x, y, w, causal, block_q=block_q, block_k=block_k)
        assert isinstance(grads, ga.HeadParams)
        assert rel_err((loss, grads), by_laws) < 1e-9
        assert rel_err((loss, grads), by_dense_autodiff) < 1e-9


@pytest.mark.slow
def test_float32_and_the_faster_precisions():
    """The paper's head sizes (d_in 20, d_k 10, d_v 15, C 8; padded to 16 inside), float32 in and
    out, against the float64 laws, under jit with the options static.

    float32: float32 accuracy (measured 3.6e-8 of the largest entry). bfloat16 tile products: a
    real, bounded error (measured 5.7e-4 here, 3.9e-3 at N = 1999 with the paper's init). tf32: in
    interpret mode on a CPU every dot is exact, so it meets the float32 bound here; its TF32
    error shows only on a GPU (benchmarks/gpu_pallas.py measures it there).
    """
    with jax.enable_x64(True):
        p64, x64, y, w64 = problem(60, d_in=20, d_k=10, d_v=15, n_classes=8, scale=0.3, weighted=True)
        ref = jax.jit(dense_loss_and_grads, static_argnums=(4,))(p64, x64, y, w64, True)
    p32, x32, w32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p64, x64, w64))
    errs = {}
    for prec in PRECISIONS:
        fn = jax.jit(functools.partial(pallas_loss_and_grads, precision=prec), static_argnums=(4,))
        loss, grads = fn(p32, x32, y, w32, True)
        assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
        errs[prec] = rel_err((loss, grads), ref)
    assert errs["float32"] < 2e-5 and errs["tf32"] < 2e-5, errs
    assert 1e-4 < errs["bfloat16"] < 5e-2, errs


@pytest.mark.slow
def test_vmap_over_seeds_is_a_grid_axis_and_equals_the_loop():
    seeds = 3

    def one(key):
        params, x, y, w = problem(33, seed=int(key), dtype=jnp.float32, weighted=True)
        return params, x, y, w

    batch = [one(s) for s in range(seeds)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *batch)
    fn = lambda p, x, y, w: pallas_loss_and_grads(p, x, y, w, True, block_q=16, block_k=16)  # noqa: E731
    many = jax.jit(jax.vmap(fn))(*stacked)
    for s in range(seeds):  # one seed, one result: bit for bit what that seed gives alone
        one_seed = jax.jit(fn)(*batch[s])
        for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one_seed)):
            np.testing.assert_array_equal(np.asarray(a[s]), np.asarray(b))
    # Both kernels take the seeds as an outer grid axis (one launch each), not a loop of launches.
    grids = re.findall(r"grid=\(([^)]*)\)", str(jax.make_jaxpr(jax.vmap(fn))(*stacked)))
    assert grids == ["3, 3", "3, 3"], grids

    # A batch of parameter sets against one shared sequence (x, y, w unbatched).
    params_only = jax.vmap(lambda p: fn(p, *batch[0][1:]))(stacked[0])
    assert rel_err(jax.tree.map(lambda a: a[2], params_only), fn(batch[2][0], *batch[0][1:])) < 1e-6


def test_no_n_by_n_array_anywhere():
    """Neither the wrapper nor the kernel bodies hold an array with two dimensions >= N."""
    n = 100  # padded to 112: tiles are 16 x 16
    params, x, y, _ = problem(n, dtype=jnp.float32)
    text = str(jax.make_jaxpr(lambda p, x, y: pallas_pass(p, x, y, block_q=16, block_k=16))(params, x, y))
    shapes = [tuple(int(d) for d in s.split(",")) for s in re.findall(r"\[(\d+(?:,\d+)+)\]", text)]
    assert shapes, "no array shapes found in the jaxpr"
    assert not [s for s in shapes if sum(d >= n for d in s) >= 2]
    assert (16, 16) in shapes  # the score tiles themselves


def _triton_ir(fn, *args, monkeypatch, capsys) -> tuple[str, str]:
    """The Triton IR that Pallas's GPU lowering makes of ``fn(*args)``, produced here on a CPU,
    and the StableHLO module that launches it.

    ``jax.export`` lowers for CUDA without a GPU; ``debug=True`` makes pallas_call print each
    kernel's Triton module. The export itself refuses Triton custom calls (no compatibility
    guarantee), a check irrelevant here and disabled. The target GPU: with no GPU present, jax
    0.10 lowers for compute capability 9.0 (an H100) by itself; later versions ask for the device
    as an abstract one, so the same H100 is named, on every version.
    """
    from jax import export
    from jax.experimental import pallas as pl

    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))
    capsys.readouterr()
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=h100)):
        exported = export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return capsys.readouterr().out, exported.mlir_module()


def test_kernels_lower_to_triton_with_the_asked_precision(monkeypatch, capsys):
    """The kernels pass the Triton lowering (powers of two, dot sizes >= 16, supported ops) for a
    GPU, seeds and all, and each precision reaches the tile products: IEEE float32 (Triton's
    default, no attribute), TF32, or bfloat16 operands; the two output-layer products stay float32."""
    pytest.importorskip(TRITON_MODULE, reason=f"this jax ({jax.__version__}) has no Pallas Triton backend")
    params, x, y, _ = problem(100, d_in=20, d_k=10, d_v=15, n_classes=8, dtype=jnp.float32)
    dots = {}
    for prec in PRECISIONS:
        fn = functools.partial(pallas_loss_and_grads, precision=prec, interpret=False)
        dots[prec] = re.findall(r"tt\.dot [^\n]*", _triton_ir(fn, params, x, y, monkeypatch=monkeypatch, capsys=capsys)[0])
        assert len(dots[prec]) == 11  # kernel 1: S twice, alpha V, b, dS K, G W_O, E W_O^T; kernel 2: S, b, dS^T Q', alpha^T U
    assert not any("inputPrecision" in d or "bf16" in d for d in dots["float32"])
    assert sum("inputPrecision = tf32" in d for d in dots["tf32"]) == 9
    assert sum("xbf16> * tensor<" in d for d in dots["bfloat16"]) == 9
    assert not any("inputPrecision" in d for d in dots["bfloat16"])

    stacked = jax.tree.map(lambda a: jnp.stack([a] * 5), (params, x, y))
    ir, launches = _triton_ir(jax.vmap(functools.partial(pallas_loss_and_grads, interpret=False)), *stacked,
                              monkeypatch=monkeypatch, capsys=capsys)
    assert ir.count("tt.dot ") == 11
    # Two launches, each over (64-row tiles of the padded N = 128) x (5 seeds).
    assert re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32", launches) == [("2", "5"), ("2", "5")]


def test_interpret_mode_needs_no_triton_and_compiling_without_it_says_so(monkeypatch):
    """Pallas's Triton backend (deprecated since jax 0.11) made unimportable: interpret mode runs
    as before, and compiling the kernels raises one clear error instead of an ImportError."""
    from jax.experimental import pallas as pl

    monkeypatch.setitem(sys.modules, TRITON_MODULE, None)  # any import of it raises ImportError
    monkeypatch.delattr(pl, "triton", raising=False)
    params, x, y, w = problem(5, dtype=jnp.float32, weighted=True)  # a shape no other test traces
    by_laws = dense_loss_and_grads(params, x, y, w, True)
    assert rel_err(pallas_loss_and_grads(params, x, y, w, True, interpret=True), by_laws) < 2e-5
    with pytest.raises(RuntimeError, match=r"gradattn\.grads\.pallas: .*no Pallas Triton.*interpret=True"):
        pallas_pass(params, x, y, w, True, interpret=False)


def test_invalid_inputs():
    params, x, y, _ = problem(9, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"pallas_pass: precision\b.*'float16'"):
        pallas_pass(params, x, y, precision="float16")
    with pytest.raises(TypeError, match=r"pallas_loss_and_grads: precision\b.*got 32"):
        pallas_loss_and_grads(params, x, y, precision=32)
    with pytest.raises(ValueError, match=r"pallas_pass: block_q\b.*power of two.*got 48"):
        pallas_pass(params, x, y, block_q=48)
    with pytest.raises(ValueError, match=r"pallas_pass: block_k\b.*\[16, inf\).*got 8"):
        pallas_pass(params, x, y, block_k=8)
    with pytest.raises(TypeError, match=r"pallas_pass: block_q\b.*integer.*16\.0"):
        pallas_pass(params, x, y, block_q=16.0)
    with pytest.raises(TypeError, match=r"pallas_pass: interpret\b.*bool.*'yes'"):
        pallas_pass(params, x, y, interpret="yes")
    with pytest.raises(ValueError, match=r"pallas_pass: y\b.*outside \[0, 6\)"):
        pallas_pass(params, x, y.at[0].set(6))
    with pytest.raises(ValueError, match=r"pallas_loss_and_grads: x\b.*2-D.*\(1, 9, 5\)"):
        pallas_loss_and_grads(params, x[None], y)
    with pytest.raises(ValueError, match=r"pallas_pass: weights\b.*sum to zero"):
        pallas_pass(params, x, y, jnp.zeros(9, jnp.float32))
    with pytest.raises(TypeError, match=r"pallas_pass: .*dtype.*x float64"):
        pallas_pass(params, x.astype(jnp.float64), y)


@pytest.mark.slow
def test_gpu_benchmark_quick_runs(tmp_path):
    """benchmarks/gpu_pallas.py --quick runs to the end (interpret mode here) and writes its JSON."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_pallas.py"), "--quick",
                           "--paths", "pallas_float32,pallas_bfloat16,dense,autodiff", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_pallas.json").read_text())
    assert result["check"]["passed"] is True
    assert {row["path"] for row in result["timing"]} >= {"pallas_float32", "pallas_bfloat16", "dense", "autodiff"}
    rows = result["timing"] + result["tiles"]
    assert not [row for row in rows if "error" in row] and not result["skipped"]
    assert all(np.isfinite(row["us_per_seed_step"]) and row["us_per_seed_step"] > 0 for row in rows)
    assert all(row["executed_vs_f32_highest"] > 0 for row in rows if row["path"].startswith("pallas_"))
