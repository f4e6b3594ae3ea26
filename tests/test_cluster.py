"""Multi-process sweeps: local processes on 127.0.0.1 give a single process's results bit for bit;
a process that dies stops the others, with a clear message, in bounded time."""

import os
import time

import jax
import numpy as np
import pytest

from _spawn import assert_same, load, run_cluster, run_one

from gradattn import cluster

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
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        cluster.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="missing coordinator"):
        cluster.initialize(None, 2, 0)
    with pytest.raises(ValueError, match=r"process_id must be an integer in \[0, 1\]"):
        cluster.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be a positive integer"):
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
    said = ["ours" if "another process has most likely died" in r["err"] else "jax" for r in runs]
    print(f"\n{how}: the others ended after {elapsed:.1f} s, status {[r['rc'] for r in runs]}, message {said}")
    for i in (0, 2):
        assert runs[i]["rc"] != 0
        assert not os.path.exists(tmp_path / f"d.{i}.npz")
        err = runs[i]["err"]
        assert ("another process has most likely died" in err
                or "JAX distributed service detected fatal errors" in err), err[-3000:]
    assert elapsed < 150  # heartbeat and shutdown timeouts of 5 and 10 s, plus start-up on a busy machine


@pytest.mark.slow
def test_processes_given_different_seeds_refuse_to_sweep(tmp_path):
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "m"),
                        "seeds_by_process": {"1": SEEDS[:-1]}}, devices=[1, 1], timeout=180)
    for i, r in enumerate(runs):
        assert r["rc"] != 0 and not os.path.exists(tmp_path / f"m.{i}.npz")
        assert "the processes were given different sweeps" in r["err"] and "processes [1] differ" in r["err"], r["err"][-3000:]
