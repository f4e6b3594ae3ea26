"""The gradattn command: the experiment's JSON and plot at tiny sizes, and bad input."""

import json
import os

import pytest

from gradattn import cli, experiments

TINY = ["--steps", "4", "--seq-len", "24", "--no-progress"]


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr), whether it returns or raises SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


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
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EM-like" in stdout and "speed-up" in stdout
    assert sorted(os.listdir(tmp_path)) == ["c.png", "r.json"]  # no temp files left behind


def test_em_vs_sgd_seeds_flag(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = run(["em-vs-sgd", "--seeds", "1", "--out", str(out)] + TINY, capsys)
    assert code == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [0] and res["p_value"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "-3"], "--seeds"),
        (["--seeds", "0"], "--seeds"),
        (["--steps", "0"], "--steps"),
        (["--steps", "-5"], "--steps"),
        (["--steps", "ten"], "--steps"),
        (["--seed-list", "1,,2"], "--seed-list"),
        (["--seed-list", "1,-2"], "--seed-list"),
        (["--seed-list", "1,1"], "--seed-list"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--seq-len", "1"], "--seq-len"),
        (["--init-scale", "-0.1"], "--init-scale"),
        (["--init-scale", "nan"], "--init-scale"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(experiments, "em_vs_sgd", lambda *a, **k: pytest.fail("the run must not start"))
    out = tmp_path / "r.json"
    code, _, err = run(["em-vs-sgd", "--out", str(out)] + args, capsys)
    assert code == 2
    assert message in err and "error" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("where", ["out", "plot"])
def test_unwritable_output_is_rejected_before_the_run(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr(experiments, "em_vs_sgd", lambda *a, **k: pytest.fail("the run must not start"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    good, bad = tmp_path / "r.json", blocker / "x.out"
    out, plot = (bad, tmp_path / "c.png") if where == "out" else (good, bad)
    code, _, err = run(["em-vs-sgd", "--out", str(out), "--plot", str(plot)] + TINY, capsys)
    assert code == 2 and f"--{where}" in err and "does not exist" in err
    assert not good.exists()
    code, _, err = run(["em-vs-sgd", "--out", str(tmp_path)] + TINY, capsys)
    assert code == 2 and "directory" in err


def test_failed_run_writes_nothing(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(experiments, "em_vs_sgd", boom)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        cli.main(["em-vs-sgd", "--out", str(out)] + TINY)
    assert os.listdir(tmp_path) == []


def test_missing_command_and_out(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    code, _, err = run(["em-vs-sgd"], capsys)
    assert code == 2 and "--out" in err


def test_laws_check(capsys):
    code, out, _ = run(["laws-check", "--n", "9"], capsys)
    assert code == 0
    assert "routing dL/ds" in out and "value dL/dv" in out and "OK" in out


def test_unsupported_plot_format_is_rejected_before_the_run(tmp_path, capsys):
    from gradattn.cli import main

    out, plot = tmp_path / "r.json", tmp_path / "curves.xyz"
    try:
        code = main(["em-vs-sgd", "--seeds", "1", "--steps", "2", "--seq-len", "8", "--out", str(out), "--plot", str(plot)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "unsupported figure format 'xyz'" in capsys.readouterr().err
    assert not out.exists() and not plot.exists()


def test_results_json_writes_non_finite_as_null_and_readable_mode(tmp_path):
    import json
    import stat

    from gradattn.cli import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.5}}, str(path))
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2.5}}
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # not owner-only, as mkstemp would leave it
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
