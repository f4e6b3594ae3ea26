"""A multi-process run that cannot start or cannot go on ends in one line naming the cause and a
documented exit status, never in a hang or a C++ abort: a malformed or unresolvable coordinator,
a coordinator port already in use, a process 0 that cannot be reached, processes given different
process counts or the same id, a process killed in the middle of a sweep (the chunks it finished
stay on disk), and a checkpoint directory that cannot be one.

Every run that could reach JAX's distributed runtime runs in a subprocess with a time limit."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from _spawn import ROOT, assert_same, env, finish, free_port, load, run_cluster, run_one, says_a_process_was_lost

from gradattn import cluster, resume

# ---- the address: checked before anything is started ----


@pytest.mark.parametrize("bad, why", [
    ("999.999.999.999:23470", r"'999\.999\.999\.999'.*IPv4"),
    ("10.0.0.256:1", r"'10\.0\.0\.256'.*IPv4"),
    ("1.2.3:1", r"'1\.2\.3'.*IPv4"),
    ("[1::2::3]:1", r"\[1::2::3\].*IPv6"),
    ("-node:1", "'-node'.*host name"),
    ("node-:1", "'node-'.*host name"),
    ("a..b:1", r"'a\.\.b'.*host name"),
    ("x" * 64 + ":1", "'" + "x" * 64 + "'.*host name"),
])
def test_a_coordinator_that_is_no_address_is_refused(bad, why):
    """One line naming the coordinator, the host part at fault and what it is not (IPv4, IPv6, a host name)."""
    why = rf"coordinator\b.*{why}"
    with pytest.raises(ValueError, match=why) as e:
        cluster.check_coordinator(bad)
    assert "HOST:PORT" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=why):
        cluster.initialize(bad, 2, 1)
    assert not jax.distributed.is_initialized()


def test_coordinator_addresses_accepted():
    for good in ("localhost:1", "node001:12345", "10.0.0.1:1", "[fe80::1]:65535", "[::ffff:10.0.0.1]:5",
                 "my_host.example.org:8476", "node.example.:80", "x" * 63 + ":1"):
        assert cluster.check_coordinator(good) == good


# ---- joining: every wait bounded in Python, before JAX's runtime starts ----

JOIN = textwrap.dedent("""
    import json, socket, sys, threading, time
    import jax
    from gradattn import cluster

    def attempt(coordinator, n, i, timeout, out):
        t = time.monotonic()
        try:
            cluster.initialize(coordinator, n, i, initialization_timeout=timeout)
            out[i if i not in out else 10 + i] = {"joined": True, "s": time.monotonic() - t}
        except Exception as e:
            out[i if i not in out else 10 + i] = {"raised": type(e).__name__, "message": str(e), "s": time.monotonic() - t}

    def scenario(name, calls):
        out = {}
        threads = [threading.Thread(target=attempt, args=(*c, out)) for c in calls]
        for th in threads:
            th.start()
            time.sleep(0.05)
        for th in threads:
            th.join()
        print(json.dumps({"scenario": name, "results": {str(k): v for k, v in out.items()},
                          "initialized": jax.distributed.is_initialized()}), flush=True)

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    scenario("unresolvable", [("no-such-host.invalid:23470", 2, 1, 5)])
    scenario("unreachable", [(f"127.0.0.1:{port()}", 2, 1, 2)])
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    scenario("port in use", [(f"127.0.0.1:{taken.getsockname()[1]}", 2, 0, 5)])
    scenario("silent program", [(f"127.0.0.1:{taken.getsockname()[1]}", 2, 1, 2)])
    talker = socket.socket()
    talker.bind(("127.0.0.1", 0))
    talker.listen()

    def talk():
        while True:
            conn, _ = talker.accept()
            conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\n\\r\\n")
            conn.close()

    threading.Thread(target=talk, daemon=True).start()
    scenario("talking program", [(f"127.0.0.1:{talker.getsockname()[1]}", 2, 1, 20)])
    p = port()
    scenario("counts differ", [(f"127.0.0.1:{p}", 2, 0, 20), (f"127.0.0.1:{p}", 3, 1, 20)])
    p = port()
    scenario("counts differ the other way", [(f"127.0.0.1:{p}", 3, 0, 20), (f"127.0.0.1:{p}", 2, 1, 20)])
    p = port()
    scenario("an id twice", [(f"127.0.0.1:{p}", 3, 0, 20), (f"127.0.0.1:{p}", 3, 1, 20), (f"127.0.0.1:{p}", 3, 1, 20)])
    p = port()
    scenario("a process missing", [(f"127.0.0.1:{p}", 3, 0, 3), (f"127.0.0.1:{p}", 3, 1, 3)])
""")


@pytest.fixture(scope="module")
def join_failures():
    """Every scenario of JOIN, run in one subprocess (none of them may start JAX's runtime)."""
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", JOIN], env=env(1), cwd=ROOT, capture_output=True, text=True, timeout=240)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timed out after 240 s"
    print(f"\njoin failures: {time.monotonic() - t0:.1f} s in one subprocess")
    found = {d["scenario"]: d for d in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    return found, f"status {rc}; stderr: {err[-2000:]}"


def _outcome(join_failures, name):
    found, how = join_failures
    assert name in found, f"scenario {name!r} did not finish ({how})"
    assert not found[name]["initialized"]
    return found[name]["results"]


def _one_line_error(result, kind, *patterns, within):
    """``result`` raised ``kind`` with a one-line message in which every regular expression of
    ``patterns`` is found, within ``within`` seconds."""
    assert result.get("raised") == kind, result
    assert len(result["message"].splitlines()) == 1, result
    for pattern in patterns:
        assert re.search(pattern, result["message"]), (pattern, result)
    assert result["s"] < within, result


def test_an_unresolvable_host_is_one_line(join_failures):
    (r,) = _outcome(join_failures, "unresolvable").values()
    assert r.get("raised") in ("ValueError", "RuntimeError"), r  # unknown, or a resolver that cannot answer
    _one_line_error(r, r["raised"], r"initialize: .*'no-such-host\.invalid'", within=60)


def test_an_unreachable_process_0_is_one_line_within_the_timeout(join_failures):
    (r,) = _outcome(join_failures, "unreachable").values()
    _one_line_error(r, "RuntimeError", r"initialize: .*reach process 0\b.*within 2 s", within=30)
    assert r["s"] >= 1.9


def test_a_coordinator_port_in_use_is_refused_by_process_0(join_failures):
    (r,) = _outcome(join_failures, "port in use").values()
    _one_line_error(r, "RuntimeError", r"initialize: .*port \d+.*in use", within=10)


@pytest.mark.parametrize("name, within", [("silent program", 30), ("talking program", 10)])
def test_another_program_on_the_port_is_one_line(join_failures, name, within):
    (r,) = _outcome(join_failures, name).values()
    _one_line_error(r, "RuntimeError", r"initialize: .*127\.0\.0\.1:\d+.*not answer.*gradattn process 0", within=within)


@pytest.mark.parametrize("name, counts", [("counts differ", (3, 2)), ("counts differ the other way", (2, 3))])
def test_processes_given_different_counts_all_refuse_naming_both(join_failures, name, counts):
    results = _outcome(join_failures, name)
    assert sorted(results) == ["0", "1"]
    for r in results.values():
        _one_line_error(r, "ValueError", rf"initialize: .*process counts.*process 1 .*num_processes {counts[0]} "
                        rf".*process 0 .*num_processes {counts[1]}\b", within=15)


def test_an_id_given_twice_stops_every_process(join_failures):
    results = _outcome(join_failures, "an id twice")
    assert len(results) == 3
    for r in results.values():
        _one_line_error(r, "ValueError", r"initialize: .*process id 1\b.*two processes", within=15)


def test_a_missing_process_stops_the_others_within_the_timeout(join_failures):
    results = _outcome(join_failures, "a process missing")
    _one_line_error(results["0"], "RuntimeError", r"initialize: .*\[2\] of 3\b.*did not join.*within 3 s", within=15)
    _one_line_error(results["1"], "RuntimeError", r"initialize: .*did not join", within=15)


# ---- the command line: one line and its exit status ----


def cli_start(argv):
    return subprocess.Popen([sys.executable, "-m", "gradattn_launcher", *argv], env=env(1), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cluster_flags(coordinator, n, i):
    return ["--coordinator", coordinator, "--num-processes", str(n), "--process-id", str(i)]


RUN = ["em-vs-sgd", "--seeds", "4", "--steps", "30", "--seq-len", "32", "--no-progress"]


@pytest.mark.slow
def test_cli_processes_given_different_counts_exit_2_naming_both(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [cli_start(RUN + ["--out", str(tmp_path / "r.json")] + cluster_flags(coordinator, 2, 0)),
             cli_start(RUN + cluster_flags(coordinator, 3, 1))]
    for r in finish(procs, timeout=180):
        assert r["rc"] == 2, r["err"][-3000:]
        assert len(r["err"].strip().splitlines()) == 1, r["err"]
        assert re.search(r"process 1 .*num_processes 3 .*process 0 .*num_processes 2\b", r["err"]), r["err"]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_cli_process_0_on_a_port_in_use_exits_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        (r,) = finish([cli_start(RUN + cluster_flags(f"127.0.0.1:{taken.getsockname()[1]}", 2, 0))], timeout=120)
    assert r["rc"] == 1 and len(r["err"].strip().splitlines()) == 1, r["err"][-3000:]
    assert re.search(r"initialize: .*port \d+.*in use", r["err"]), r["err"]


def _chunks(d):
    return sorted(f for f in os.listdir(d) if f.startswith("chunk-")) if os.path.isdir(d) else []


@pytest.mark.slow
def test_cli_process_killed_mid_sweep_ends_process_0_in_one_line_and_keeps_the_chunks(tmp_path):
    ck = str(tmp_path / "ck")
    coordinator = f"127.0.0.1:{free_port()}"
    argv = ["em-vs-sgd", "--seeds", "40", "--steps", "3000", "--seq-len", "32", "--no-progress", "--checkpoint-dir", ck]
    procs = [cli_start(argv + ["--out", str(tmp_path / "r.json")] + cluster_flags(coordinator, 2, 0)),
             cli_start(argv + cluster_flags(coordinator, 2, 1))]
    try:
        deadline = time.monotonic() + 180
        while len(_chunks(ck)) < 2 and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        before = _chunks(ck)
        assert len(before) >= 2 and procs[1].poll() is None, "the sweep did not get going"
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
    finally:
        runs = finish(procs, timeout=120)
    r = runs[0]
    print(f"\nprocess 0 ended {r['at'] - killed:.1f} s after process 1 was killed, status {r['rc']}, "
          f"{len(_chunks(ck))} chunk(s) kept")
    assert r["rc"] == cluster.PEER_LOST_EXIT, r["err"][-3000:]
    assert len(r["err"].strip().splitlines()) == 1 and says_a_process_was_lost(r["err"]), r["err"][-3000:]
    assert ck in r["err"]
    assert r["at"] - killed < 60  # at once, not after JAX's heartbeat timeout
    assert set(before) <= set(_chunks(ck)) and os.path.exists(os.path.join(ck, resume.MANIFEST))
    assert not (tmp_path / "r.json").exists()


# ---- the library: a process lost in the middle of a sweep ----

SEEDS = list(range(9))


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_a_process_killed_mid_sweep_ends_the_others_in_one_line_and_a_rerun_resumes(tmp_path, lost):
    ck = str(tmp_path / "ck")
    common = {"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "checkpoint_dir": ck, "fingerprint": {"test": "lost"}}
    t0 = time.monotonic()
    runs = run_cluster(dict(common, out=str(tmp_path / "d"), exit_process=lost, crash_after_calls=2, kill="sigkill"),
                       devices=[1, 1, 1], timeout=180)
    print(f"\nprocess {lost} killed: the others ended after {time.monotonic() - t0:.1f} s, status {[r['rc'] for r in runs]}")
    assert runs[lost]["rc"] == -signal.SIGKILL
    for i in {0, 1, 2} - {lost}:
        err = runs[i]["err"]
        assert runs[i]["rc"] == cluster.PEER_LOST_EXIT, err[-3000:]
        lines = err.strip().splitlines()
        assert lines[-1].startswith("gradattn: error: ") and says_a_process_was_lost(lines[-1]), err[-3000:]
        if lost == 0:  # the coordinator's death reaches JAX's runtime at the same moment: it may log first
            assert "Check failure stack trace" not in err and not any(says_a_process_was_lost(x) for x in lines[:-1]), err
        else:
            assert len(lines) == 1, err[-3000:]
        assert not os.path.exists(tmp_path / f"d.{i}.npz")
    kept = _chunks(ck)
    assert kept  # what finished is on disk, and a rerun uses it
    run_one(dict(common, out=str(tmp_path / "rerun.npz")))
    run_one({"mode": "ref", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "ref.npz")})
    assert_same(load(tmp_path / "rerun.npz"), load(tmp_path / "ref.npz"))


@pytest.mark.slow
def test_a_process_lost_while_the_others_compute_ends_them_at_once(tmp_path):
    # each call sleeps 8 s on the host, longer than the heartbeat timeout (5 s): the others are in
    # the middle of a call, not in a collective, when process 1 dies in its second call
    t0 = time.monotonic()
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS[:4], "chunk_size": 1, "out": str(tmp_path / "c"), "pause": 8,
                        "crash_after_calls": 1, "kill": "sigkill"}, devices=[1, 1], timeout=180)
    r = runs[0]
    print(f"\nprocess 0 ended after {time.monotonic() - t0:.1f} s, status {r['rc']}")
    assert r["rc"] == cluster.PEER_LOST_EXIT, r["err"][-3000:]
    assert len(r["err"].strip().splitlines()) == 1 and says_a_process_was_lost(r["err"]), r["err"][-3000:]
    assert "Check failure" not in r["err"] and "Terminating process" not in r["err"]


# ---- a checkpoint directory that cannot be one: refused at the door ----


def _traced_fn(calls):
    def fn(key):
        calls.append(1)
        return {"x": jax.random.normal(key, (2,))}
    return fn


@pytest.mark.parametrize("where, why", [
    ("{file}/ck", "cannot be created.*'{file}'.*not a directory"),
    ("{file}/a/b", "cannot be created.*'{file}'.*not a directory"),
    ("{file}", "exists.*not a directory"),
    ("/proc/gradattn-ck", "cannot create files"),
    ("", "empty path"),
])
def test_a_checkpoint_dir_that_cannot_be_one_is_refused_before_anything_runs(tmp_path, where, why):
    """One line naming the function and its argument, and (``why``, a regular expression) the part
    of the path at fault and the kind of failure; refused before ``fn`` is traced, the file untouched."""
    if where.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("x")
    where, why = where.replace("{file}", str(tmp_path / "file")), why.replace("{file}", re.escape(str(tmp_path / "file")))
    calls = []
    with pytest.raises(resume.SweepRefused) as e:
        cluster.cluster_sweep(_traced_fn(calls), [0, 1], chunk_size=1, checkpoint_dir=where, fingerprint={"t": 1})
    message = str(e.value)
    assert message.startswith("cluster_sweep: checkpoint_dir") and re.search(why, message) and len(message.splitlines()) == 1
    assert calls == []  # refused before fn was traced
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
def test_a_checkpoint_dir_one_process_cannot_use_stops_every_process(tmp_path):
    (tmp_path / "file").write_text("x")
    runs = run_cluster({"mode": "cluster", "seeds": SEEDS, "chunk_size": 1, "out": str(tmp_path / "r"), "fingerprint": {"t": 1},
                        "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_dir_by_process": {"1": str(tmp_path / "file" / "ck")}},
                       devices=[1, 1], timeout=180)
    assert "checkpoint_dir" in runs[1]["err"] and "not a directory" in runs[1]["err"], runs[1]["err"][-3000:]
    assert re.search(r"cluster_sweep: .*\[1\] refused.*checkpoint", runs[0]["err"]), runs[0]["err"][-3000:]
    for i, r in enumerate(runs):
        assert r["rc"] == 1 and "SweepRefused" in r["err"] and not os.path.exists(tmp_path / f"r.{i}.npz")  # an uncaught exception
        assert "Check failure" not in r["err"] and not says_a_process_was_lost(r["err"])  # both stop together, cleanly
    assert not _chunks(tmp_path / "ck")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user (root may write anywhere)")
def test_a_checkpoint_dir_in_a_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(resume.SweepRefused, match=r"cluster_sweep: checkpoint_dir\b.*cannot create files"):
            cluster.cluster_sweep(_traced_fn([]), [0], chunk_size=1, checkpoint_dir=str(ro / "ck"), fingerprint={"t": 1})
    finally:
        ro.chmod(0o700)


def test_a_usable_checkpoint_dir_still_works(tmp_path):
    out = cluster.cluster_sweep(_traced_fn([]), [0, 1], chunk_size=1, checkpoint_dir=str(tmp_path / "a" / "b"),
                                fingerprint={"t": 1})
    assert out["x"].shape == (2, 2) and np.isfinite(out["x"]).all()
    assert len(_chunks(tmp_path / "a" / "b")) == 2
    assert not [f for f in os.listdir(tmp_path / "a" / "b") if f.startswith(".gradattn-probe-")]
