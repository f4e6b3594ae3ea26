"""The gradattn command: the experiment's JSON and plot at tiny sizes, bad input, files, interrupts."""

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import jax
import pytest

from _cli import TINY, cli_run, cli_run as run

import gradattn
from gradattn import _io, cli, experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_run(monkeypatch):
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: pytest.fail("the run must not start"))


def test_em_vs_sgd_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "c.png"
    code, stdout, _ = run(["em-vs-sgd", "--seed-list", "3,7", "--out", str(out), "--plot", str(plot)] + TINY, capsys)
    assert code == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [3, 7] and res["steps"] == 4
    for arm in ("sgd", "em"):
        for key in ("final_loss_mean", "final_loss_std", "final_entropy_mean", "final_accuracy_mean"):
            assert isinstance(res[arm][key], float)
    assert set(res["em_steps_to_sgd_final"]) == {"mean", "std"}
    assert isinstance(res["speedup"], float) and "p_value" in res and "h_min" in res
    for key in ("seed", "sgd_final_loss", "em_final_loss", "em_steps_to_sgd_final"):
        assert len(res["per_seed"][key]) == 2
    assert len(res["curves"]["sgd_mean"]) == 4 and len(res["curves"]["em_std"]) == 4
    prov = res["provenance"]
    for key in ("versions", "git", "backend", "devices", "cpu", "start_time", "wall_time_s"):
        assert key in prov, key
    assert prov["versions"]["gradattn"] and prov["versions"]["jax"] and prov["wall_time_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EM-like" in stdout and "speed-up" in stdout
    assert sorted(os.listdir(tmp_path)) == ["c.png", "r.json"]  # no temp files left behind


def test_every_config_field_is_a_flag(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["em-vs-sgd", "--seeds", "1", "--out", str(out), "--steps", "3", "--seq-len", "16", "--no-progress",
            "--sgd-lr", "0.02", "--value-lr", "0.3", "--routing-lr", "0.005", "--d-k", "4", "--d-v", "6",
            "--init-scale", "0.2", "--grad-source", "dense", "--self-prob", "0.4", "--embed-seed", "3"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["steps"], cfg["sgd_lr"], cfg["value_lr"], cfg["routing_lr"]) == (3, 0.02, 0.3, 0.005)
    assert (cfg["d_k"], cfg["d_v"], cfg["init_scale"], cfg["grad_source"]) == (4, 6, 0.2, "dense")
    assert (cfg["task"]["seq_len"], cfg["task"]["self_prob"], cfg["task"]["embeddings"]) == (16, 0.4, "seed:3")
    import dataclasses

    from gradattn.experiments import registry

    # Every option of every experiment's config (its nested specs' included, by their flat names)
    # and of its task gets its flag, made from the field itself.
    parser = cli.build_parser()
    commands = [e for e in registry() if e.command is not None]
    assert {e.command for e in commands} == {"em-vs-sgd", "deep", "plateau", "manifold", "bijection",
                                             "windtunnel-bijection", "windtunnel-hmm", "em-mechanism", "feedback-loop"}
    for command in commands:
        sub = parser.parse_args([command.command, "--out", "x.json"])
        for cls in (command.config_type, type(command.config_type().task)):
            names = set()
            for f in dataclasses.fields(cls):
                spec = f.metadata.get("nested")
                names |= {g.name for g in dataclasses.fields(spec)} if spec else {f.name}
            names -= {"task", "embedding_source"}
            assert names <= set(vars(sub)), (command.command, names - set(vars(sub)))


def test_em_vs_sgd_seeds_flag(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = run(["em-vs-sgd", "--seeds", "1", "--out", str(out)] + TINY, capsys)
    assert code == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [0] and res["p_value"] is None


def test_seeds_beyond_2_to_the_32_do_not_collide(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = run(["em-vs-sgd", "--seed-list", "0,4294967296", "--out", str(out)] + TINY, capsys)
    assert code == 0
    per = json.loads(out.read_text())["per_seed"]
    assert per["sgd_final_loss"][0] != per["sgd_final_loss"][1]
    _, zero, _ = run(["laws-check", "--n", "7", "--seed", "0"], capsys)
    _, big, _ = run(["laws-check", "--n", "7", "--seed", "4294967296"], capsys)
    assert zero.splitlines()[1:] != big.splitlines()[1:]  # another random instance, other errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "-3"], "--seeds"),
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "1000000000000"], "--seeds"),
        (["--seeds", "10000000"], "--seeds"),
        (["--seeds", "400000", "--steps", "10000"], "GiB"),
        (["--steps", "0"], "--steps"),
        (["--steps", "-5"], "--steps"),
        (["--steps", "ten"], "--steps"),
        (["--steps", "1000000000000"], "--steps"),
        (["--seed-list", "1,,2"], "--seed-list"),
        (["--seed-list", "1,-2"], "--seed-list"),
        (["--seed-list", "1,1"], "--seed-list"),
        (["--seed-list", "18446744073709551616"], "--seed-list"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--seq-len", "1"], "--seq-len"),
        (["--seq-len", "1000000000000"], "--seq-len"),
        (["--d-k", "1000000000000"], "--d-k"),
        (["--init-scale", "-0.1"], "--init-scale"),
        (["--init-scale", "nan"], "--init-scale"),
        (["--init-scale", "0"], "--init-scale"),
        (["--sgd-lr", "inf"], "--sgd-lr"),
        (["--grad-source", "magic"], r"--grad-source\b.*'auto'.*'magic'"),
        (["--self-prob", "1"], "--self-prob"),
        (["--noise-std", "0"], "--noise-std"),
        (["--embeddings", "nonsense"], "--embeddings"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    """Exit 2, one line on stderr naming the flag (``message`` is a regular expression), no file."""
    no_run(monkeypatch)
    out = tmp_path / "r.json"
    code, _, err = run(["em-vs-sgd", "--out", str(out)] + args, capsys)
    assert code == 2
    assert re.search(message, err) and "error" in err, (message, err)
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args", [["--n", "1000000000000"], ["--n", "0"], ["--seed", "18446744073709551616"], ["--seed", "-1"]])
def test_laws_check_bounds(capsys, args):
    code, _, err = run(["laws-check"] + args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_largest_seed_is_accepted(capsys):
    code, out, _ = run(["laws-check", "--n", "5", "--seed", str(2**64 - 1)], capsys)
    assert code == 0 and "OK" in out


@pytest.mark.parametrize("where", ["out", "plot"])
def test_unwritable_output_is_rejected_before_the_run(tmp_path, capsys, monkeypatch, where):
    no_run(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    good, bad = tmp_path / "r.json", blocker / "x.out"
    out, plot = (bad, tmp_path / "c.png") if where == "out" else (good, bad)
    code, _, err = run(["em-vs-sgd", "--out", str(out), "--plot", str(plot)] + TINY, capsys)
    assert code == 2 and f"--{where}" in err and f"{str(blocker)!r}" in err and "not a directory" in err
    assert not good.exists()
    code, _, err = run(["em-vs-sgd", "--out", str(tmp_path)] + TINY, capsys)
    assert code == 2 and "directory" in err


def test_non_regular_targets_are_refused(tmp_path, capsys, monkeypatch):
    no_run(monkeypatch)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(["em-vs-sgd", "--out", str(fifo)] + TINY, capsys)
    assert code == 2 and "--out" in err and repr(str(fifo)) in err and "regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    code, _, err = run(["em-vs-sgd", "--out", str(tmp_path / "r.json"), "--plot", str(fifo)] + TINY, capsys)
    assert code == 2 and "--plot" in err and repr(str(fifo)) in err and "regular file" in err
    if os.geteuid() == 0:  # a replica of /dev/full: as root, replacing it would have worked
        dev = tmp_path / "full"
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        code, _, err = run(["em-vs-sgd", "--out", str(dev)] + TINY, capsys)
        assert code == 2 and repr(str(dev)) in err and "regular file" in err
        assert stat.S_ISCHR(os.lstat(dev).st_mode)
    link = tmp_path / "to_fifo"
    link.symlink_to(fifo)
    code, _, err = run(["em-vs-sgd", "--out", str(link)] + TINY, capsys)
    assert code == 2 and "regular file" in err and link.is_symlink()


def test_symlink_is_followed_and_stays_a_link(tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, _ = run(["em-vs-sgd", "--seeds", "1", "--out", str(link)] + TINY, capsys)
    assert code == 0
    assert link.is_symlink() and json.loads(real.read_text())["seeds"] == [0]
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_out_and_plot_naming_one_file_is_refused(tmp_path, capsys, monkeypatch):
    no_run(monkeypatch)
    path = tmp_path / "r.png"
    code, _, err = run(["em-vs-sgd", "--out", str(path), "--plot", str(path)] + TINY, capsys)
    assert code == 2 and "same file" in err
    link = tmp_path / "l.png"
    link.symlink_to(path)
    code, _, err = run(["em-vs-sgd", "--out", str(path), "--plot", str(link)] + TINY, capsys)
    assert code == 2 and "same file" in err


def test_full_disk_prints_summary_then_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io.os, "fsync", no_space)
    out = tmp_path / "r.json"
    code, stdout, err = run(["em-vs-sgd", "--seeds", "1", "--out", str(out)] + TINY, capsys)
    assert code == 1
    assert "EM-like" in stdout  # the summary came first
    assert len(err.strip().splitlines()) == 1 and str(out) in err and "No space left" in err
    assert os.listdir(tmp_path) == []  # nothing partial


def test_failed_run_writes_nothing(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(experiments, "run_experiment", boom)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        cli.main(["em-vs-sgd", "--out", str(out)] + TINY)
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.json.gradattn-{dead.pid}-abc123.tmp"
    stale.write_text('{"complete": "but never renamed"}')
    live = tmp_path / f".r.json.gradattn-{os.getpid()}-def456.tmp"  # a writer that is still running
    live.write_text("{}")
    other = tmp_path / f".other.json.gradattn-{dead.pid}-abc123.tmp"  # another target's
    other.write_text("{}")
    code, _, _ = run(["em-vs-sgd", "--seeds", "1", "--out", str(tmp_path / "r.json")] + TINY, capsys)
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["r.json", live.name, other.name])


def test_missing_command_and_out(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    # --out is optional (the summary is printed either way): tests/test_cli.py::test_summary_only_run_writes_nothing


def test_laws_check(capsys):
    code, out, _ = run(["laws-check", "--n", "9"], capsys)
    assert code == 0
    assert "routing dL/ds" in out and "value dL/dv" in out and "OK" in out


def test_unsupported_plot_format_is_rejected_before_the_run(tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "curves.xyz"
    code, _, err = run(["em-vs-sgd", "--seeds", "1", "--steps", "2", "--seq-len", "8", "--out", str(out), "--plot", str(plot)], capsys)
    assert code == 2
    assert "--plot" in err and "unsupported" in err and "'xyz'" in err
    assert not out.exists() and not plot.exists()


def test_results_json_writes_non_finite_as_null_and_readable_mode(tmp_path):
    path = tmp_path / "r.json"
    _io.write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.5}}, str(path))
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2.5}}
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # not owner-only, as mkstemp would leave it
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _interrupt_after(delay, tmp_path):
    """Start the real command (the console script's entry), send SIGINT after ``delay`` seconds."""
    argv = [sys.executable, "-m", "gradattn_launcher", "em-vs-sgd", "--seeds", "2", "--steps", "20000",
            "--seq-len", "600", "--no-progress", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("delay", [0.2, 2.5, 6.0])  # importing, compiling, training (on a 2-core machine)
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path, delay):
    code, _, err = _interrupt_after(delay, tmp_path)  # the run itself would take minutes
    assert code == 130, err[-2000:]
    assert err.strip().splitlines() == ["gradattn: interrupted"]
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


DEEP_TINY = ["--steps", "4", "--seq-len", "24", "--d-model", "8", "--n-layers", "1", "--n-heads", "2",
             "--n-checkpoints", "2", "--no-progress"]


def test_deep_writes_json_with_the_heldout_table(tmp_path, capsys):
    out, plot = tmp_path / "d.json", tmp_path / "d.png"
    code, stdout, err = run(["deep", "--seeds", "2", "--out", str(out), "--plot", str(plot)] + DEEP_TINY, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1] and res["steps"] == 4 and "h_min" in res and "config" in res
    for key in ("loss_mean", "loss_std", "entropy_mean", "accuracy_mean", "bayes_loss_mean", "gap_to_bayes_mean"):
        assert isinstance(res["heldout"][key], float), key
    assert res["law_check"]["worst_rel_error"] < 1e-9
    assert "provenance" in res and plot.read_bytes()[:4] == b"\x89PNG"
    assert "held-out" in stdout


@pytest.mark.parametrize("args, message", [(["--n-heads", "3"], "divisible"), (["--dropout", "1"], "--dropout"),
                                           (["--n-checkpoints", "3"], "divide"), (["--clip", "0"], "--clip")])
def test_deep_bad_arguments_exit_2(tmp_path, capsys, monkeypatch, args, message):
    no_run(monkeypatch)
    out = tmp_path / "d.json"
    tiny = DEEP_TINY
    if args[0] in tiny:  # a flag may be given once: the case's value replaces the tiny one
        i = tiny.index(args[0])
        tiny = tiny[:i] + tiny[i + 2:]
    code, _, err = run(["deep", "--out", str(out)] + tiny + args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_every_integer_and_number_flag_goes_through_one_parser(monkeypatch):
    """Integer flags parse their text with cli._int_arg and number flags with cli._float_arg only."""
    seen = []
    monkeypatch.setattr(cli, "_int_arg", lambda text: seen.append(("int", text)) or int(text))
    monkeypatch.setattr(cli, "_float_arg", lambda text: seen.append(("float", text)) or float(text))
    parser = cli.build_parser()
    parser.parse_args(["em-vs-sgd", "--out", "x.json", "--seeds", "3", "--steps", "4", "--d-k", "5", "--seq-len", "6",
                       "--chunk-size", "7", "--sgd-lr", "0.5", "--noise-std", "2"])
    parser.parse_args(["deep", "--out", "x.json", "--seed-list", "8,9", "--n-layers", "2", "--dropout", "0.25"])
    parser.parse_args(["laws-check", "--n", "10", "--seed", "11"])
    assert sorted(t for k, t in seen if k == "int") == sorted(["3", "4", "5", "6", "7", "8", "9", "2", "10", "11"])
    assert sorted(t for k, t in seen if k == "float") == ["0.25", "0.5", "2"]


# --------------------------------------------------------------------------------------------
# Version, python -m, summary-only runs, errors in the flags' words, rerun
# --------------------------------------------------------------------------------------------


def test_version_flag(capsys):
    code, out, _ = cli_run(["--version"], capsys)
    assert code == 0 and out.strip() == f"gradattn {gradattn.__version__} (jax {jax.__version__})"


@pytest.mark.slow
def test_python_dash_m_gradattn_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "gradattn", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: gradattn" in proc.stdout and "rerun" in proc.stdout


def test_summary_only_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_run(["em-vs-sgd", "--seeds", "2", *TINY], capsys)
    assert code == 0, err
    assert "EM-like vs SGD" in out and "wrote" not in out and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["plateau", "--steps", "45", "--checkpoint-every", "40"], "--checkpoint-every 40 must divide --steps 45"),
    (["manifold", "--n-components", "16"], "--n-components 16 exceeds --d-v 15"),
    (["deep", "--d-model", "64", "--n-heads", "3"], "--d-model 64 must be divisible by --n-heads 3"),
    (["em-vs-sgd", "--d-k", "0"], "argument --d-k: must be an integer in [1, 4096], got 0"),
])
def test_errors_name_the_flags_the_user_typed(argv, message, capsys):
    code, _, err = cli_run([*argv, "--no-progress"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "Config" not in err, err


@pytest.mark.parametrize("command, extra", [
    ("em-vs-sgd", []),
    ("manifold", ["--heldout", "1"]),
])
def test_rerun_reproduces_a_result_bit_for_bit(command, extra, tmp_path, capsys):
    """A result JSON holds everything its run needs: `gradattn rerun` rebuilds the config, seeds and
    chunk size, and every per-seed number (the per-seed curves included) comes out equal."""
    first = tmp_path / "a.json"
    code, _, err = cli_run([command, "--seed-list", "3,5", *TINY, *extra, "--per-seed-curves", "--out", str(first)], capsys)
    assert code == 0, err
    a = json.loads(first.read_text())
    assert a["format"] == 2 and set(a["per_seed_curves"]) == {"sgd_curve", "em_curve"}
    code, out, err = cli_run(["rerun", str(first), "--no-progress", "--out", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    assert f"per-seed results: identical to {first}" in out
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["per_seed"] == a["per_seed"] and b["per_seed_curves"] == a["per_seed_curves"] and b["config"] == a["config"]


def test_rerun_says_when_numbers_differ_and_refuses_what_is_not_a_result(tmp_path, capsys):
    first = tmp_path / "a.json"
    code, _, err = cli_run(["em-vs-sgd", "--seeds", "2", *TINY, "--out", str(first)], capsys)
    assert code == 0, err
    edited = json.loads(first.read_text())
    edited["per_seed"]["sgd_final_loss"][0] += 0.5
    first.write_text(json.dumps(edited))
    code, out, _ = cli_run(["rerun", str(first), "--no-progress"], capsys)
    assert code == 0 and "1 of" in out and "differ" in out and "per_seed.sgd_final_loss" in out
    for text, message in (("{", "cannot read"), ('{"experiment": "x"}', "is not a gradattn result"),
                          ('{"experiment": "em_vs_sgd", "config": {}}', "cannot rebuild")):
        first.write_text(text)
        code, _, err = cli_run(["rerun", str(first)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_help_defines_h_min_and_the_spread(capsys):
    code, out, _ = cli_run(["em-vs-sgd", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "H_min, printed with the results, is the loss of an oracle that knows the previous symbol" in text
    assert "sample standard deviation" in text
