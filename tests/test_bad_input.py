"""Bad input a new user might give, at the command line and to the library.

Command-line cases run the command's entry (``gradattn.cli.main``) in the test's own process,
with stdout and stderr captured, and must stop with exit status 2 and one line on stderr, before
any work: nothing on stdout (the summary comes only after the run) and no output file. Where a case
would let a run start, the run is tiny. One case runs the real console entry in a subprocess
(``python -m gradattn_launcher``), to show that what reaches a user's terminal is that same line.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradattn as ga
from gradattn import cli
from gradattn.experiments.deep import DeepConfig
from gradattn.tasks import StickyMarkov, embeddings_from_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seeds", "1", "--steps", "1", "--seq-len", "16", "--no-progress"]
DEEP_TINY = ["--seeds", "1", "--steps", "1", "--seq-len", "16", "--d-model", "8", "--n-layers", "1", "--n-heads", "2",
             "--n-checkpoints", "0", "--no-progress"]


def without(args, *flags):
    """``args`` (a list of flags and their values) without ``flags`` and their values: a flag may be
    given only once, so a case that sets one of them again leaves the tiny default out."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a in flags:
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
        else:
            out.append(a)
    return out


class Proc(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def gradattn(args, cwd):
    """``gradattn ARGS`` in this process, from ``cwd``: its exit status and everything it printed
    (warnings included: they are shown on the captured stderr, not collected by pytest)."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: err.write(warnings.formatwarning(m, c, f, n, line))
            try:
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
    return Proc(code, out.getvalue(), err.getvalue())


def gradattn_process(args, cwd, timeout=180):
    """Run ``python -m gradattn_launcher ARGS`` with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gradattn_launcher", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def assert_refused(proc, *needles):
    """Exit 2, one line on stderr naming ``needles``, no traceback, no summary (so no work was done)."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert len(err.strip().splitlines()) == 1, err[-2000:]
    assert "Traceback" not in err and "error" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert proc.stdout == ""


def test_console_entry_gives_the_same_one_line_and_exit_2(tmp_path):
    """The installed command's entry (the launcher, then the CLI) prints the one-line refusal and
    exits 2, with no traceback, as the in-process runs below see it."""
    proc = gradattn_process(["em-vs-sgd", "--out", ""] + TINY, tmp_path)
    assert_refused(proc, "--out", "empty")
    assert proc.stderr == gradattn(["em-vs-sgd", "--out", ""] + TINY, tmp_path).stderr
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["--out", "--plot"])
def test_symlink_loop_is_one_line_and_exit_2(tmp_path, where):
    loop = tmp_path / "loop.png"
    os.symlink("loop.png", loop)  # points at itself
    out, plot = (str(loop), str(tmp_path / "c.png")) if where == "--out" else (str(tmp_path / "r.json"), str(loop))
    proc = gradattn(["em-vs-sgd", "--out", out, "--plot", plot] + TINY, tmp_path)
    assert_refused(proc, where, "symbolic links")
    assert sorted(os.listdir(tmp_path)) == ["loop.png"]


@pytest.mark.parametrize("as_directory", [False, True])
def test_name_longer_than_the_os_allows_is_one_line_and_exit_2(tmp_path, as_directory):
    long = "a" * 300
    out = tmp_path / long / "r.json" if as_directory else tmp_path / (long + ".json")
    proc = gradattn(["em-vs-sgd", "--out", str(out)] + TINY, tmp_path)
    assert_refused(proc, "--out", "too long")
    assert os.listdir(tmp_path) == []


def test_empty_out_is_refused_before_the_run(tmp_path):
    proc = gradattn(["em-vs-sgd", "--out", ""] + TINY, tmp_path)
    assert_refused(proc, "--out", "empty")
    assert os.listdir(tmp_path) == []


def test_out_ending_in_a_separator_is_refused_before_the_run(tmp_path):
    proc = gradattn(["em-vs-sgd", "--out", str(tmp_path / "results") + os.sep] + TINY, tmp_path)
    assert_refused(proc, "--out", "directory")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("directory", ["/proc", "/sys"])
def test_directory_where_no_file_can_be_created_is_refused_before_the_run(tmp_path, directory):
    if not os.path.isdir(directory):
        pytest.skip(f"no {directory} here")
    target = os.path.join(directory, "gradattn-r.json")
    proc = gradattn(["em-vs-sgd", "--out", target] + TINY, tmp_path)
    assert_refused(proc, "--out", "cannot create", directory)
    assert not os.path.exists(target)


# --------------------------------------------------------------------------------------------
# Numbers on the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["em-vs-sgd", "--seeds", "\u0663"], "--seeds"),  # Arabic-Indic 3
        (["em-vs-sgd", "--seeds", "\uff13"], "--seeds"),  # full-width 3
        (["em-vs-sgd", "--seeds", "1_0"], "--seeds"),
        (["em-vs-sgd", "--seed-list", "1,\u0663"], "--seed-list"),
        (["em-vs-sgd", "--steps", "\uff11"], "--steps"),
        (["em-vs-sgd", "--chunk-size", "1_0"], "--chunk-size"),
        (["em-vs-sgd", "--embed-seed", "\u0663"], "--embed-seed"),
        (["em-vs-sgd", "--embeddings", "seed:\u0663"], "--embeddings"),
        (["deep", "--n-heads", "\uff12"], "--n-heads"),
        (["laws-check", "--n", "\u0663"], "--n"),
        (["laws-check", "--seed", "1_0"], "--seed"),
    ],
)
def test_integers_are_ascii_decimal_digits_only(tmp_path, args, flag):
    command = args[0]
    rest = args[1:] + ([] if command == "laws-check" else ["--out", str(tmp_path / "r.json")])
    tiny = {"em-vs-sgd": TINY, "deep": DEEP_TINY, "laws-check": []}[command]
    tiny = without(tiny, flag, "--seeds")  # --seeds and --seed-list exclude each other
    proc = gradattn([command] + tiny + rest, tmp_path)
    assert_refused(proc, flag, "ASCII")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args, flag",
    [(["--sgd-lr", "0_1"], "--sgd-lr"), (["--noise-std", "\u0661"], "--noise-std"), (["--init-scale", " 0.1"], "--init-scale")],
)
def test_numbers_are_plain_ascii_decimals(tmp_path, args, flag):
    proc = gradattn(["em-vs-sgd", "--out", str(tmp_path / "r.json")] + TINY + args, tmp_path)
    assert_refused(proc, flag, "ASCII")


def _config(path):
    return json.loads(path.read_text())["config"]


def test_seed_n_and_embed_seed_follow_one_rule(tmp_path):
    big = str(2**32)  # was accepted as seed:N but refused as --embed-seed
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    pa = gradattn(["em-vs-sgd", "--out", str(a), "--embeddings", "seed:" + big] + TINY, tmp_path)
    pb = gradattn(["em-vs-sgd", "--out", str(b), "--embed-seed", big] + TINY, tmp_path)
    assert pa.returncode == 0, pa.stderr[-2000:]
    assert pb.returncode == 0, pb.stderr[-2000:]
    assert _config(a)["task"]["embeddings"] == _config(b)["task"]["embeddings"] == "seed:" + big
    assert json.loads(a.read_text())["per_seed"] == json.loads(b.read_text())["per_seed"]
    assert StickyMarkov(embed_seed=2**32) == StickyMarkov(**embeddings_from_spec("seed:" + big))


@pytest.mark.parametrize("form", [["--embeddings", "seed:18446744073709551616"], ["--embed-seed", "18446744073709551616"]])
def test_seed_n_and_embed_seed_refuse_2_to_the_64(tmp_path, form):
    proc = gradattn(["em-vs-sgd", "--out", str(tmp_path / "r.json")] + TINY + form, tmp_path)
    assert_refused(proc, form[0])
    with pytest.raises(ValueError, match=r"StickyMarkov: embed_seed\b.*18446744073709551615"):
        StickyMarkov(embed_seed=2**64)


# --------------------------------------------------------------------------------------------
# Rates and sizes of the deep model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, args, needle",
    [
        ("deep", ["--lr", "1e300"], "--lr"),
        ("deep", ["--weight-decay", "1e39"], "--weight-decay"),
        ("em-vs-sgd", ["--sgd-lr", "1e39"], "--sgd-lr"),
        ("deep", ["--value-lr-multiplier", "5"], "--two-timescale"),
        ("deep", ["--value-lr-multiplier", "10"], "--two-timescale"),  # the default value: still ignored
    ],
)
def test_rates_beyond_float32_and_an_ignored_multiplier_are_refused(tmp_path, command, args, needle):
    tiny = DEEP_TINY if command == "deep" else TINY
    proc = gradattn([command, "--out", str(tmp_path / "r.json")] + tiny + args, tmp_path)
    assert_refused(proc, needle)
    assert os.listdir(tmp_path) == []


def test_library_rates_are_finite_in_float32():
    with pytest.raises(ValueError, match=r"DeepConfig: lr\b.*1e\+300.*beyond float32"):
        DeepConfig(lr=1e300)
    with pytest.raises(ValueError, match=r"DeepConfig: lr \* value_lr_multiplier.*beyond float32"):
        DeepConfig(lr=1e30, schedule="two_timescale", value_lr_multiplier=1e10)
    with pytest.raises(ValueError, match=r"DeepConfig: lr \* weight_decay.*beyond float32"):
        DeepConfig(lr=1e30, weight_decay=1e10)
    with pytest.raises(ValueError, match=r"ArmRates: routing_lr\b.*beyond float32"):
        ga.ArmRates(routing_lr=1e39)
    assert DeepConfig(lr=1e30, schedule="two_timescale", value_lr_multiplier=1e8).lr == 1e30  # 1e38 fits


def test_library_value_lr_multiplier_needs_two_timescale():
    with pytest.raises(ValueError, match=r'DeepConfig: value_lr_multiplier=5\.0.*no effect.*schedule="two_timescale"'):
        DeepConfig(value_lr_multiplier=5.0)
    assert DeepConfig(value_lr_multiplier=5.0, schedule="two_timescale").value_lr_multiplier == 5.0


def test_deep_combined_size_is_bounded_before_any_work(tmp_path):
    huge = ["--d-model", "4096", "--n-heads", "256", "--n-layers", "64", "--seq-len", "65537"]  # each within its bound
    tiny = without(DEEP_TINY, *huge[::2])
    proc = gradattn(["deep", "--out", str(tmp_path / "d.json")] + tiny + huge, tmp_path)
    assert_refused(proc, "GiB", "--d-model 4096", "--n-layers 64", "--n-heads 256", "N=65536", "FLOPs")
    assert os.listdir(tmp_path) == []


def test_library_deep_combined_size_names_sizes_and_estimate():
    with pytest.raises(ValueError, match=r"DeepConfig: d_model=4096.*n_layers=64.*n_heads=256.*N=65536.*GiB"):
        DeepConfig(d_model=4096, n_heads=256, n_layers=64, task=StickyMarkov(seq_len=65537))
    with pytest.raises(ValueError, match=r"DeepConfig: .*N=65536.*GiB"):  # the default model on the longest sequence: N x N per head
        DeepConfig(task=StickyMarkov(seq_len=65537))
    assert DeepConfig().d_model == 64  # the reference protocol fits


# --------------------------------------------------------------------------------------------
# Library: causal, keys, head sizes, duplicate seeds
# --------------------------------------------------------------------------------------------


def _head():
    params = ga.init_head(jax.random.key(0), 3, 2, 2, 4)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float32)
    return params, x, jnp.array([0, 1, 2, 3, 0])


@pytest.mark.parametrize("causal", ["no", 0, 1, None, jnp.array(True)])
def test_causal_must_be_a_bool(causal):
    params, x, y = _head()
    with pytest.raises(TypeError, match=r"forward: causal\b.*bool"):
        ga.forward(params, x, causal=causal)
    with pytest.raises(TypeError, match=r"dense_loss: causal\b.*bool"):
        ga.dense_loss(params, x, y, causal=causal)
    for fn in (ga.blocked_loss_and_grads, ga.loss_fn, ga.dense_loss_and_grads, ga.autodiff_loss_and_grads,
               ga.grads.blocked.blocked_pass, ga.grads.blocked.blocked_loss):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: causal\b.*bool"):
            fn(params, x, y, causal=causal)
    np.testing.assert_array_equal(ga.forward(params, x, causal=np.bool_(False)).alpha, ga.forward(params, x, causal=False).alpha)


@pytest.mark.parametrize("key", [0, 7.0, "key", None, np.int64(3)])
def test_init_head_needs_a_prng_key(key):
    with pytest.raises(TypeError, match=r"init_head: key\b.*PRNG key"):
        ga.init_head(key, 3, 2, 2, 4)


def test_init_head_refuses_a_batch_of_keys_and_takes_raw_keys():
    with pytest.raises(TypeError, match=r"init_head: key\b.*one PRNG key.*\(2,\)"):
        ga.init_head(jax.random.split(jax.random.key(0), 2), 3, 2, 2, 4)
    raw = ga.init_head(jax.random.PRNGKey(0), 3, 2, 2, 4)
    typed = ga.init_head(jax.random.key(0), 3, 2, 2, 4)
    np.testing.assert_array_equal(raw.w_q, typed.w_q)


@pytest.mark.parametrize("which", range(4))
def test_init_head_has_the_command_lines_head_size_bound(tmp_path, which):
    sizes = [3, 2, 2, 4]
    sizes[which] = 4097
    name = ("d_in", "d_k", "d_v", "n_classes")[which]
    with pytest.raises(ValueError, match=rf"init_head: {name}\b.*\[1, 4096\].*got 4097"):
        ga.init_head(jax.random.key(0), *sizes)
    sizes[which] = 4096  # the bound itself is accepted
    assert ga.init_head(jax.random.key(0), *sizes)[0].shape[0] == sizes[0]


def test_command_line_head_size_bound_is_the_same(tmp_path):
    proc = gradattn(["em-vs-sgd", "--out", str(tmp_path / "r.json"), "--d-k", "4097"] + TINY, tmp_path)
    assert_refused(proc, "--d-k", "4096")
    with pytest.raises(ValueError, match=r"init_head: d_k\b.*4096"):
        ga.init_head(jax.random.key(0), 3, 4097, 2, 4)


@pytest.mark.parametrize(
    "seeds",
    [[1, 1], [3, 1, 2, 1], np.array([5, 5]), jnp.stack([jax.random.key(2), jax.random.key(2)])],
    ids=["list", "later", "array", "keys"],
)
def test_sweep_refuses_duplicate_seeds(seeds):
    calls = []

    def fn(k):
        calls.append(1)
        return {"u": jax.random.uniform(k)}

    with pytest.raises(ValueError, match=r"sweep: seeds\b.*must be distinct.*seeds\[\d\].*seeds\[\d\]"):
        ga.sweep(fn, seeds, chunk_size=2)
    assert calls == []  # refused before tracing


# --------------------------------------------------------------------------------------------
# No warnings on valid input
# --------------------------------------------------------------------------------------------


def test_self_prob_zero_has_no_numpy_warning(tmp_path):
    proc = gradattn(["em-vs-sgd", "--out", str(tmp_path / "r.json"), "--self-prob", "0"] + TINY, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr and "divide" not in proc.stderr, proc.stderr
    task = StickyMarkov(self_prob=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = task.sample(jax.random.key(0))
    assert not np.any(np.asarray(y[1:]) == np.asarray(y[:-1]))  # the diagonal is 0: a symbol never repeats


def test_sticky_markov_alone_enforces_the_bounds_of_its_fields():
    """The task's own constructor takes the bounds its fields declare (the command line's), not
    only the experiment configs that hold it."""
    from gradattn.tasks import StickyMarkov

    with pytest.raises(ValueError, match="n_symbols"):
        StickyMarkov(n_symbols=1025, d_embed=4)
    with pytest.raises(ValueError, match="seq_len"):
        StickyMarkov(seq_len=65_538)
    with pytest.raises(ValueError, match="d_embed"):
        StickyMarkov(n_symbols=4, d_embed=4097)
    assert StickyMarkov(n_symbols=1024, d_embed=4, seq_len=16).n_symbols == 1024


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"n": 0}, ValueError, "n"), ({"n": 2.0}, TypeError, "n"), ({"d_k": 4097}, ValueError, "d_k"),
    ({"n_classes": 1}, ValueError, "n_classes"), ({"causal": "no"}, TypeError, "causal"), ({"key": 0}, TypeError, "key"),
])
def test_laws_check_errors_checks_its_sizes_at_the_door(kwargs, exc, name):
    from gradattn.verify import laws_check_errors

    with pytest.raises(exc, match=rf"laws_check_errors: {name}\b"):
        laws_check_errors(**kwargs)


TOO_BIG_TOGETHER = [
    (["em-vs-sgd", "--seeds", "1", "--steps", "2", "--chunk-size", "65536"],
     ("--chunk-size 65536", "1 seed", "padded", "TiB", "smaller --chunk-size")),
    (["em-vs-sgd", "--d-embed", "4096", "--n-symbols", "1024", "--seq-len", "65537", "--d-k", "4096", "--d-v", "4096"],
     ("--seq-len 65537", "--d-embed 4096", "--n-symbols 1024", "--d-k 4096", "--d-v 4096", "GiB")),
    (["manifold", "--heldout", "4096", "--seq-len", "65537"], ("--heldout 4096", "--seq-len 65537", "TiB")),
    (["bijection", "--n-symbols", "1024", "--heldout", "1000000", "--batch", "65536"],
     ("--n-symbols 1024", "--heldout 1000000", "--batch 65536", "TiB")),
    (["plateau", "--seq-len", "65537", "--settle-rows", "65536", "--checkpoint-every", "1"],
     ("--seq-len 65537", "--settle-rows 65536", "--checkpoint-every 1", "PiB")),
]


@pytest.mark.parametrize("args,needles", TOO_BIG_TOGETHER)
def test_sizes_too_big_together_for_memory_are_refused_before_any_work(tmp_path, monkeypatch, args, needles):
    """Sizes each within their bounds but too big together are refused from the configuration's
    memory estimate, in one line naming them as flags, before any sweep starts."""
    from gradattn import memory
    from gradattn.experiments import _base

    monkeypatch.setattr(memory, "physical_memory", lambda: 16 << 30)  # the same host on every machine

    def sweep(*a, **k):
        raise AssertionError("the sweep was reached")

    monkeypatch.setattr(_base, "cluster_sweep", sweep)
    proc = gradattn([*args, "--out", "r.json", "--no-progress", "--no-compilation-cache"], tmp_path)
    assert_refused(proc, "at least", "physical memory", "16 GiB", *needles)
    assert os.listdir(tmp_path) == []
