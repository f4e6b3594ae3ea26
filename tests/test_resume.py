"""Resumable sweeps: finished chunks survive a kill, a rerun computes only the rest and gives the
uninterrupted run's results bit for bit; another configuration's directory is refused; a damaged
chunk is detected and recomputed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from _cli import TINY, cli_run
from _spawn import ROOT, assert_same, env, finish, load, start

from gradattn import experiments, resume
from gradattn.cluster import cluster_sweep
from gradattn.sweeps import sweep


def fn(key):
    a = jax.random.normal(key, (5, 5))
    return {"h": jnp.tanh(a @ a).sum(0), "pos": (a > 0).sum(), "big": a.max() > 1.0}


def other_fn(key):
    return {"h": jax.random.normal(key, (3,))}


FP = {"config": {"steps": 4, "lr": 0.1}, "task": "test", "version": "0"}
SEEDS = list(range(9))


def chunks(d):
    return sorted(f for f in os.listdir(d) if f.startswith("chunk-"))


def stamps(d):
    return {f: (os.stat(os.path.join(d, f)).st_ino, os.stat(os.path.join(d, f)).st_mtime_ns) for f in chunks(d)}


@pytest.fixture(scope="module")
def expected():
    return sweep(fn, SEEDS, chunk_size=2)


def test_checkpointed_sweep_equals_sweep_and_resumes_only_the_missing(tmp_path, expected):
    d = str(tmp_path / "ck")
    out = cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    assert_same(out, expected)
    assert len(chunks(d)) == 5  # 9 seeds in calls of 2 (one device)
    assert json.load(open(os.path.join(d, "manifest.json")))["fingerprint"] == FP
    gone = chunks(d)[1:3]
    for f in gone:
        os.unlink(os.path.join(d, f))
    kept = stamps(d)
    again = cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    assert_same(again, expected)
    assert {f: stamps(d)[f] for f in kept} == kept  # read, not rewritten
    assert set(chunks(d)) - set(kept) == set(gone)  # the same calls again (names are the keys' hash)


def test_more_seeds_reuse_the_finished_ones(tmp_path):
    d = str(tmp_path / "ck")
    cluster_sweep(fn, SEEDS[:4], chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    kept = stamps(d)
    out = cluster_sweep(fn, [8, 0, 1, 2, 3, 9], chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    assert_same(out, sweep(fn, [8, 0, 1, 2, 3, 9], chunk_size=2))
    assert {f: stamps(d)[f] for f in kept} == kept and len(chunks(d)) == 3  # only seeds 8 and 9 computed


def test_another_configuration_is_refused(tmp_path):
    d = str(tmp_path / "ck")
    cluster_sweep(fn, SEEDS[:3], chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    other = dict(FP, config={"steps": 4, "lr": 0.2})
    with pytest.raises(ValueError, match=r"cluster_sweep: checkpoint_dir\b.*another configuration"
                                         r".*fingerprint\.config\.lr\b.*0\.1 on disk.*0\.2 now"):
        cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=other)
    with pytest.raises(ValueError, match=r"sweep\.chunk_size\b.*2 on disk.*3 now"):
        cluster_sweep(fn, SEEDS, chunk_size=3, checkpoint_dir=d, fingerprint=FP)
    with pytest.raises(ValueError, match=r"sweep\.outputs"):  # same fingerprint, another fn's outputs
        cluster_sweep(other_fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    with jax.enable_x64(False):  # another dtype of the same outputs
        with pytest.raises(ValueError, match=r"sweep\.x64"):
            cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    # a chunk copied in from another directory carries its manifest's hash
    e = str(tmp_path / "other")
    cluster_sweep(fn, [20], chunk_size=2, checkpoint_dir=e, fingerprint=other)
    os.replace(os.path.join(e, chunks(e)[0]), os.path.join(d, chunks(e)[0]))
    with pytest.raises(ValueError, match=r"cluster_sweep: .*chunk-\w+\.npz\b.*another configuration"):
        cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    # chunks without a manifest: of unknown origin
    os.unlink(os.path.join(d, "manifest.json"))
    with pytest.raises(ValueError, match=r"cluster_sweep: checkpoint_dir\b.*no manifest\.json"):
        cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"cluster_sweep: .*checkpoint_dir\b.*needs a fingerprint"):
        cluster_sweep(fn, SEEDS, checkpoint_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"cluster_sweep: fingerprint\b.*JSON-able"):
        cluster_sweep(fn, SEEDS, checkpoint_dir=str(tmp_path), fingerprint={"lr": {0.1}})
    with pytest.raises(TypeError, match=r"cluster_sweep: fingerprint\b.*JSON-able dict.*got list"):
        cluster_sweep(fn, SEEDS, checkpoint_dir=str(tmp_path), fingerprint=[1])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"cluster_sweep: checkpoint_dir\b.*file'.*not a directory"):
        cluster_sweep(fn, SEEDS, checkpoint_dir=str(tmp_path / "file"), fingerprint=FP)
    with pytest.raises(TypeError, match=r"cluster_sweep: fn\b.*callable.*got 3"):
        cluster_sweep(3, SEEDS)
    with pytest.raises(ValueError, match=r"cluster_sweep: chunk_size\b.*got 0"):
        cluster_sweep(fn, SEEDS, chunk_size=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_chunk_is_detected_and_recomputed(tmp_path, expected, damage):
    d = str(tmp_path / "ck")
    cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    victim = os.path.join(d, chunks(d)[2])
    data = open(victim, "rb").read()
    data = {"truncate": data[: len(data) // 2], "flip": data[:-40] + bytes([data[-40] ^ 1]) + data[-39:],
            "empty": b"", "garbage": b"not a chunk\n" + data}[damage]
    open(victim, "wb").write(data)
    with pytest.warns(RuntimeWarning, match=rf"cluster_sweep: .*{re.escape(os.path.basename(victim))}\b.*recomputed"):
        out = cluster_sweep(fn, SEEDS, chunk_size=2, checkpoint_dir=d, fingerprint=FP)
    assert_same(out, expected)
    store = resume.open_store(d, json.load(open(os.path.join(d, "manifest.json"))))
    assert len(store.load()) == 5  # every chunk readable again


def test_manifest_records_what_changes_results(tmp_path):
    cluster_sweep(fn, [1], chunk_size=3, checkpoint_dir=str(tmp_path), fingerprint=FP)
    m = json.load(open(tmp_path / "manifest.json"))
    assert m["sweep"]["chunk_size"] == 3 and m["sweep"]["jax"] == jax.__version__ and m["sweep"]["backend"] == "cpu"
    assert m["sweep"]["outputs"]["leaves"] == [[[], "bool"], [[5], "float64"], [[], "int64"]]  # x64 is on in the tests


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    d = str(tmp_path / "ck")
    seeds = list(range(16))
    base = {"mode": "cluster", "seeds": seeds, "chunk_size": 1, "checkpoint_dir": d, "fingerprint": FP}
    proc = start(dict(base, pause=0.25, out=str(tmp_path / "killed.npz")))  # 16 calls of at least 0.25 s
    deadline = time.monotonic() + 120
    try:
        while not (os.path.isdir(d) and len(chunks(d)) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no chunk files after 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = stamps(d)
    print(f"\nkilled after {len(finished)} of 16 chunks")
    assert 3 <= len(finished) < 16
    t0 = time.monotonic()
    rerun, ref = finish([start(dict(base, out=str(tmp_path / "rerun.npz"))),
                         start({"mode": "ref", "seeds": seeds, "chunk_size": 1, "out": str(tmp_path / "ref.npz")})], timeout=180)
    for r in (rerun, ref):
        assert r["rc"] == 0, r["err"][-3000:]
    print(f"rerun and uninterrupted run: {time.monotonic() - t0:.1f} s; sweep_s {rerun['report']['sweep_s']:.1f} "
          f"(resumed) and {ref['report']['sweep_s']:.1f} (whole)")
    assert_same(load(tmp_path / "rerun.npz"), load(tmp_path / "ref.npz"))
    assert {f: stamps(d)[f] for f in finished} == finished and len(chunks(d)) == 16
    assert not [f for f in os.listdir(d) if f.startswith(".")]  # the killed run's temp file, if any, is gone


# ---- the command line: --checkpoint-dir ----

def cli_start(argv, devices=1):
    """The gradattn command in its own process (a plain one: no cluster variables; one CPU device)."""
    return subprocess.Popen([sys.executable, "-m", "gradattn_launcher", *argv], env=env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_results(a: dict, b: dict) -> None:
    assert a["seeds"] == b["seeds"]
    assert a["per_seed"] == b["per_seed"]  # floats through JSON: equal bit for bit
    assert a["curves"] == b["curves"]


def test_cli_checkpoint_dir_resumes_and_refuses_another_configuration(tmp_path, capsys):
    d = tmp_path / "ck"
    base = ["em-vs-sgd", "--checkpoint-dir", str(d)] + TINY
    code, _, err = cli_run(base + ["--seeds", "3", "--out", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    assert len(chunks(d)) == 3  # one seed per call on CPU
    manifest = json.load(open(d / "manifest.json"))
    assert manifest["fingerprint"]["experiment"] == "em_vs_sgd" and manifest["fingerprint"]["config"]["steps"] == 4
    assert manifest["fingerprint"]["config"]["task"]["name"] == "StickyMarkov"
    kept = stamps(d)
    # another learning rate: refused at start-up, one line, exit 2, nothing written
    code, _, err = cli_run(base + ["--seeds", "3", "--sgd-lr", "0.02", "--out", str(tmp_path / "b.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"another configuration.*fingerprint\.config\.sgd_lr\b.*0\.01 on disk.*0\.02 now", err), err
    assert not (tmp_path / "b.json").exists() and stamps(d) == kept
    # more seeds: the three on disk are read, the fourth computed; equal to a run without a directory
    code, _, err = cli_run(base + ["--seeds", "4", "--out", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    assert {f: stamps(d)[f] for f in kept} == kept and len(chunks(d)) == 4
    code, _, err = cli_run(["em-vs-sgd", "--seeds", "4", "--out", str(tmp_path / "ref.json")] + TINY, capsys)
    assert code == 0, err
    resumed, ref = (json.load(open(tmp_path / f)) for f in ("c.json", "ref.json"))
    assert_same_results(resumed, ref)
    assert resumed["n_processes"] == ref["n_processes"] == 1


@pytest.mark.slow
def test_cli_killed_mid_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    d = str(tmp_path / "ck")
    n = 8
    run = ["em-vs-sgd", "--seeds", str(n), "--steps", "1000", "--seq-len", "32", "--no-progress"]
    killed = tmp_path / "killed.json"
    proc = cli_start(run + ["--checkpoint-dir", d, "--out", str(killed)])
    deadline = time.monotonic() + 240
    try:
        while not (os.path.isdir(d) and chunks(d)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no chunk file after 240 s"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = stamps(d)
    print(f"\nCLI killed after {len(finished)} of {n} chunks")
    assert 1 <= len(finished) < n and not killed.exists()
    t0 = time.monotonic()
    rerun, ref = finish([cli_start(run + ["--checkpoint-dir", d, "--out", str(tmp_path / "rerun.json")]),
                         cli_start(run + ["--out", str(tmp_path / "ref.json")])], timeout=400)
    for r in (rerun, ref):
        assert r["rc"] == 0, r["err"][-3000:]
    resumed, whole = (json.load(open(tmp_path / f)) for f in ("rerun.json", "ref.json"))
    print(f"rerun and uninterrupted run side by side: {time.monotonic() - t0:.1f} s; sweep wall_time_s "
          f"{resumed['wall_time_s']:.1f} (resumed) and {whole['wall_time_s']:.1f} (whole)")
    assert_same_results(resumed, whole)
    assert {f: stamps(d)[f] for f in finished} == finished and len(chunks(d)) == n  # read, not recomputed
    assert not [f for f in os.listdir(d) if f.startswith(".")]  # a temp file the kill left, if any, is gone


def test_run_experiment_checkpoint_arguments(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Plain:  # no to_dict: nothing to tie a directory to
        scale: float = 1.0

    toy = experiments.Experiment("toy", Plain, lambda c: (lambda key: {"u": c.scale * jax.random.uniform(key)}),
                                 lambda per_seed, seeds, c: {"u": per_seed["u"].tolist()})
    with pytest.raises(TypeError, match=r"toy: .*checkpoint_dir\b.*to_dict.*Plain"):
        experiments.run_experiment(toy, 2, checkpoint_dir=str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match=r"em_vs_sgd: checkpoint_dir\b.*without devices"):
        experiments.em_vs_sgd(2, checkpoint_dir=str(tmp_path / "ck"), devices=jax.devices())
    out = experiments.run_experiment(toy, 2)  # without a directory a plain config is fine
    assert out["n_processes"] == 1 and out["n_devices"] == jax.device_count() and len(out["u"]) == 2
