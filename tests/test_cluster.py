"""Multi-process sweeps: local processes on 127.0.0.1 give a single process's results bit for bit;
a process that dies stops the others, with a clear message, in bounded time."""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from _cli import TINY, cli_run
from _spawn import ROOT, assert_same, env, finish, free_port, load, run_cluster, run_one, says_a_process_was_lost

from gradattn import cli, cluster, experiments

SEEDS = list(range(13))


# ---- initialize: validation and the single-process cases (in this process, which stays plain) ----


@pytest.mark.parametrize("bad", ["localhost", "host:", ":123", "host:0", "host:65536", "host:12a", "a b:1", "[zz]:1", "h:1:2"])
def test_initialize_rejects_a_malformed_coordinator(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        cluster.initialize(bad, 2, 0)


def test_coordinator_forms_accepted():
    for good in ("node001:12345", "10.0.0.1:1", "[fe80::1]:65535", "my-host.example.org:8476"):
        assert cluster.check_coordinator(good) == good
    with pytest.raises(TypeError, match="coordinator"):
        cluster.check_coordinator(12345)


def test_initialize_needs_all_three_or_none():
    with pytest.raises(ValueError, match=r"initialize: .*missing num_processes, process_id"):
        cluster.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"initialize: .*missing coordinator"):
        cluster.initialize(None, 2, 0)
    with pytest.raises(ValueError, match=r"initialize: process_id\b.*\[0, 1\].*got 2"):
        cluster.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"initialize: num_processes\b.*positive integer.*got 0"):
        cluster.initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="initialization_timeout"):
        cluster.initialize(initialization_timeout=0)


def test_single_process_is_left_plain(monkeypatch):
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert cluster.initialize() is False  # no launcher: nothing to join
    assert cluster.initialize("127.0.0.1:1234", 1, 0) is False  # a cluster of one
    assert not jax.distributed.is_initialized()
    assert cluster.is_primary() and jax.process_count() == 1


def test_launcher_detection(monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for k in (*slurm, "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert cluster._detected_cluster() is None
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert cluster._detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task step (or salloc's shell) is a plain process
    assert cluster._detected_cluster() is None
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert cluster._detected_cluster() == "ompi"


def test_schedule_is_round_robin_with_each_process_call_size():
    rounds = cluster._schedule(np.arange(11), [2, 1, 2])
    assert [[(p, pos.tolist()) for p, pos in r] for r in rounds] == [
        [(0, [0, 1]), (1, [2]), (2, [3, 4])],
        [(0, [5, 6]), (1, [7]), (2, [8, 9])],
        [(0, [10])],
    ]


# ---- several processes on this machine ----


def _timing(label, runs):
    wall = max(r["at"] for r in runs) - min(r["at"] for r in runs)
    sweeps = ", ".join(f"{r['report']['sweep_s']:.1f}" for r in runs)
    print(f"\n{label}: sweep_s per process [{sweeps}], process_s max {max(r['report']['process_s'] for r in runs):.1f}")
    return wall


@pytest.mark.slow
def test_two_processes_equal_one_process_bit_for_bit(tmp_path):
    # chunk_size 1 is the CLI's default on CPU; process 0 has two devices, process 1 one
    common = {"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "checkpoint_dir": str(tmp_path / "ck"), "fingerprint": {"test": 2}}
    ref = run_one({"mode": "ref", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "ref.npz")})
    _timing("1 process (sweeps.sweep)", [ref])
    runs = run_cluster(dict(common, out=str(tmp_path / "two")), devices=[2, 1])
    for r in runs:
        assert r["rc"] == 0, r["err"][-3000:]
    _timing("2 processes", runs)
    expected = load(tmp_path / "ref.npz")
    for i, r in enumerate(runs):
        assert r["report"] == {**r["report"], "process": i, "processes": 2, "primary": i == 0}
        assert_same(load(tmp_path / f"two.{i}.npz"), expected)  # every process has the whole result
    # calls of 2 and 1 seeds, in turn: 13 seeds in 9 calls, each kept on disk
    assert len([f for f in os.listdir(tmp_path / "ck") if f.startswith("chunk-")]) == 9


@pytest.mark.slow
def test_three_processes_resume_a_partial_directory_bit_for_bit(tmp_path):
    ck = str(tmp_path / "ck")
    fp = {"test": 3}
    # a single process finishes the first 5 seeds into the directory; three processes then do the rest
    run_one({"mode": "cluster", "seeds": SEEDS[:5], "chunk_size": 2, "checkpoint_dir": ck, "fingerprint": fp, "out": str(tmp_path / "part.npz")})
    before = {f: os.stat(os.path.join(ck, f)).st_mtime_ns for f in os.listdir(ck) if f.startswith("chunk-")}
    assert len(before) == 3
    ref = run_one({"mode": "ref", "seeds": SEEDS, "chunk_size": 2, "out": str(tmp_path / "ref.npz")})
    _timing("1 process (sweeps.sweep)", [ref])
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS, "chunk_size": 2, "checkpoint_dir": ck, "fingerprint": fp,
                        "out": str(tmp_path / "three")}, devices=[1, 2, 1])
    for r in runs:
        assert r["rc"] == 0, r["err"][-3000:]
    _timing("3 processes", runs)
    expected = load(tmp_path / "ref.npz")
    for i in range(3):
        assert_same(load(tmp_path / f"three.{i}.npz"), expected)
    after = {f: os.stat(os.path.join(ck, f)).st_mtime_ns for f in os.listdir(ck) if f.startswith("chunk-")}
    assert {f: after[f] for f in before} == before  # the finished chunks were read, not rewritten
    # the 8 missing seeds: calls of 2, 4 and 2 seeds in turn
    assert len(after) == len(before) + 3


@pytest.mark.slow
@pytest.mark.parametrize("how", ["crash", "exit", "crash mid-sweep"])
def test_a_process_that_dies_stops_the_others(tmp_path, how):
    t0 = time.monotonic()
    death = {"crash_after_calls": 2} if how == "crash mid-sweep" else {"exit_before_sweep": how}
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "d"), "exit_process": 1,
                        **death}, devices=[1, 1, 1], timeout=180)
    elapsed = time.monotonic() - t0
    print(f"\n{how}: the others ended after {elapsed:.1f} s, status {[r['rc'] for r in runs]}")
    for i in (0, 2):  # one line naming the cause, the documented status, no C++ abort
        assert runs[i]["rc"] == cluster.PEER_LOST_EXIT, runs[i]["err"][-3000:]
        assert not os.path.exists(tmp_path / f"d.{i}.npz")
        err = runs[i]["err"]
        assert len(err.strip().splitlines()) == 1 and says_a_process_was_lost(err), err[-3000:]
    assert elapsed < 150  # start-up on a busy machine; the loss itself is seen at once


@pytest.mark.slow
def test_processes_given_different_seeds_refuse_to_sweep(tmp_path):
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "m"),
                        "seeds_by_process": {"1": SEEDS[:-1]}}, devices=[1, 1], timeout=180)
    for i, r in enumerate(runs):
        assert r["rc"] != 0 and not os.path.exists(tmp_path / f"m.{i}.npz")
        assert re.search(r"cluster_sweep: .*different sweeps.*\[1\] differ", r["err"]), r["err"][-3000:]


# ---- the command line over several processes ----

@pytest.mark.parametrize("command", ["em-vs-sgd", "deep"])
@pytest.mark.parametrize("args, message", [
    (["--coordinator", "localhost"], r"--coordinator\b.*HOST:PORT.*'localhost'"),
    (["--coordinator", "127.0.0.1:0", "--num-processes", "2", "--process-id", "0"], r"--coordinator\b.*1\.\.65535.*'127\.0\.0\.1:0'"),
    (["--coordinator", "999.999.999.999:23470", "--num-processes", "2", "--process-id", "1"],
     r"--coordinator\b.*'999\.999\.999\.999'.*not a valid IPv4"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "missing --process-id"),
    (["--process-id", "0"], "missing --coordinator, --num-processes"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], r"--process-id\b.*\[0, 1\].*got 2"),
    (["--num-processes", "0"], "--num-processes"),
    (["--num-processes", "2.0"], "--num-processes"),
    (["--process-id", "-1"], "--process-id"),
    (["--checkpoint-dir", "{file}"], r"--checkpoint-dir\b.*'{file}' exists.*not a directory"),
    (["--checkpoint-dir", "{file}/ck"], r"--checkpoint-dir\b.*'{file}'.*not a directory"),
    (["--checkpoint-dir", ""], "--checkpoint-dir"),
])
def test_cli_cluster_flags_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch, command, args, message):
    """One line on stderr, exit 2, nothing joined, run or written; ``message`` is a regular expression
    of the flag, the bound or the value at fault, and the kind of failure ({file}: the file's path)."""
    monkeypatch.setattr(cluster, "initialize", lambda *a, **k: pytest.fail("must not join a cluster"))
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: pytest.fail("the run must not start"))
    (tmp_path / "file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    out = tmp_path / "r.json"
    code, _, err = cli_run([command, "--out", str(out)] + TINY + args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message.replace("{file}", re.escape(str(tmp_path / "file"))), err), (message, err)
    assert not out.exists()


def test_cli_cluster_integers_go_through_the_one_integer_parser(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_int_arg", lambda text: seen.append(text) or int(text))
    cli.build_parser().parse_args(["deep", "--out", "x.json", "--coordinator", "h:1", "--num-processes", "3", "--process-id", "2"])
    assert sorted(seen) == ["2", "3"]


def test_cli_joins_before_the_run_and_a_cluster_of_one_is_a_plain_process(tmp_path, capsys, monkeypatch):
    calls = []
    real_initialize, real_run = cluster.initialize, experiments.run_experiment

    def initialize(*a, **k):
        calls.append(("initialize", a))
        return real_initialize(*a, **k)

    def run(*a, **k):
        calls.append(("run", k["checkpoint_dir"]))
        return real_run(*a, **k)

    monkeypatch.setattr(cluster, "initialize", initialize)
    monkeypatch.setattr(experiments, "run_experiment", run)
    out = tmp_path / "r.json"
    flags = ["--coordinator", "127.0.0.1:9", "--num-processes", "1", "--process-id", "0"]
    code, stdout, err = cli_run(["em-vs-sgd", "--seeds", "2", "--out", str(out)] + TINY + flags, capsys)
    assert code == 0, err
    assert calls == [("initialize", ("127.0.0.1:9", 1, 0)), ("run", None)]
    assert json.loads(out.read_text())["n_processes"] == 1 and f"wrote {out}" in stdout
    calls.clear()
    code, _, err = cli_run(["em-vs-sgd", "--seeds", "2", "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck")] + TINY, capsys)
    assert code == 0, err
    assert calls == [("initialize", ()), ("run", str(tmp_path / "ck"))]  # no flags: JAX's own detection (none here)


SWEEP = ["--steps", "30", "--seq-len", "32", "--no-progress"]
N_SEEDS = 7


def cli_start(argv, devices=1):
    """The gradattn command in its own process, with ``devices`` CPU devices and no cluster variables."""
    return subprocess.Popen([sys.executable, "-m", "gradattn_launcher", *argv], env=env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_cluster(argv, devices, outs, timeout=400):
    """``len(devices)`` processes of one command on 127.0.0.1 (process i: ``devices[i]`` devices, ``--out outs[i]``)."""
    coordinator = f"127.0.0.1:{free_port()}"
    flags = lambda i: ["--coordinator", coordinator, "--num-processes", str(len(devices)), "--process-id", str(i)]  # noqa: E731
    t0 = time.monotonic()
    procs = [cli_start(argv + flags(i) + ["--out", str(outs[i])], n) for i, n in enumerate(devices)]
    runs = finish(procs, timeout)
    for r in runs:
        r["wall"] = r["at"] - t0
    return runs


def assert_same_results(a, b):
    assert a["seeds"] == b["seeds"] and a["per_seed"] == b["per_seed"] and a["curves"] == b["curves"]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.json"
    t0 = time.monotonic()
    (r,) = finish([cli_start(["em-vs-sgd", "--seeds", str(N_SEEDS)] + SWEEP + ["--out", str(path)])], timeout=300)
    assert r["rc"] == 0, r["err"][-3000:]
    res = json.loads(path.read_text())
    print(f"\nCLI, 1 process, {N_SEEDS} seeds: {time.monotonic() - t0:.1f} s from start to exit, sweep {res['wall_time_s']:.1f} s")
    return res


def check_cluster_runs(runs, outs, expected, label):
    for r in runs:
        assert r["rc"] == 0, r["err"][-3000:]
    res = json.loads(outs[0].read_text())
    print(f"\nCLI, {label}: {max(r['wall'] for r in runs):.1f} s from start to exit, sweep {res['wall_time_s']:.1f} s (process 0)")
    assert_same_results(res, expected)
    assert res["n_processes"] == len(runs)
    assert f"wrote {outs[0]}" in runs[0]["out"] and "EM-like" in runs[0]["out"]
    for i in range(1, len(runs)):  # only process 0 prints the summary and writes
        assert not os.path.exists(outs[i])
        assert f"process {i} of {len(runs)}: sweep done" in runs[i]["out"] and "EM-like" not in runs[i]["out"]
    return res


@pytest.mark.slow
def test_cli_two_processes_equal_one_process_and_only_process_0_writes(tmp_path, cli_reference):
    outs = [tmp_path / "two.json", tmp_path / "two.1.json"]
    runs = cli_cluster(["em-vs-sgd", "--seeds", str(N_SEEDS)] + SWEEP, [1, 1], outs)
    res = check_cluster_runs(runs, outs, cli_reference, "2 processes x 1 device")
    assert res["n_devices"] == 2


@pytest.mark.slow
def test_cli_three_processes_resume_a_one_process_checkpoint(tmp_path, cli_reference):
    ck = str(tmp_path / "ck")
    (r,) = finish([cli_start(["em-vs-sgd", "--seeds", "3"] + SWEEP + ["--checkpoint-dir", ck, "--out", str(tmp_path / "part.json")])],
                  timeout=300)
    assert r["rc"] == 0, r["err"][-3000:]
    before = {f: os.stat(os.path.join(ck, f)).st_mtime_ns for f in os.listdir(ck) if f.startswith("chunk-")}
    assert len(before) == 3
    outs = [tmp_path / "three.json", tmp_path / "three.1.json", tmp_path / "three.2.json"]
    runs = cli_cluster(["em-vs-sgd", "--seeds", str(N_SEEDS), "--checkpoint-dir", ck] + SWEEP, [1, 2, 1], outs)
    res = check_cluster_runs(runs, outs, cli_reference, "3 processes x 1, 2, 1 devices, 3 of 7 seeds on disk")
    assert res["n_devices"] == 4
    after = {f: os.stat(os.path.join(ck, f)).st_mtime_ns for f in os.listdir(ck) if f.startswith("chunk-")}
    assert {f: after[f] for f in before} == before  # read, not recomputed
    assert len(after) == len(before) + 3  # the 4 missing seeds in calls of 1, 2 and 1 seeds
