"""Output paths checked the way the operating system resolves them, and a command line read strictly.

Every case runs the command's entry (``gradattn.cli.main``) in this process. A refusal is exit status
2 and one line on stderr, before any work: the experiment's function is replaced by one that fails
the test if it is called. Where a case must be accepted, the experiment's function is replaced by
one that stops the command with :class:`Reached`, so that the test knows every check passed without
running anything; one case runs a tiny sweep to see where the file lands.
"""

import json
import os

import pytest

from _cli import cli_run

from gradattn import _io, cli, experiments
from gradattn.experiments.plateau import PlateauConfig

S = ["--steps", "5", "--seq-len", "16", "--no-progress", "--no-compilation-cache"]
"""Small, valid flags of any command whose task is the sticky chain."""
class Reached(Exception):
    """Raised in place of the experiment: every check passed and the run would start."""


def no_run(monkeypatch):
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: pytest.fail("the run must not start"))


def reach_run(monkeypatch):
    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(experiments, "run_experiment", stop)


def refused(argv, capsys, monkeypatch, *needles):
    """``gradattn ARGV`` exits 2 with one line on stderr naming ``needles``, and starts no run."""
    no_run(monkeypatch)
    code, out, err = cli_run(argv, capsys)
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "error" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert out == ""
    return err


def accepted(argv, capsys, monkeypatch):
    """Every check of ``gradattn ARGV`` passes: the run is reached."""
    reach_run(monkeypatch)
    with pytest.raises(Reached):
        cli_run(argv, capsys)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The test's directory as the working directory, with a directory ``d`` and a regular file ``afile``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "afile").write_text("a regular file")
    return tmp_path


# --------------------------------------------------------------------------------------------
# '..' is resolved on disk, as the write will resolve it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["--out", "--plot"])
@pytest.mark.parametrize("path, reason", [
    ("d/../nonexist/../o.{ext}", "does not exist"),  # tidied as text this is ./o.json; on disk it is nothing
    ("afile/../o.{ext}", "not a directory"),  # likewise: a regular file has no '..'
    ("afile/..", "not a directory"),
    ("nonexist/..", "does not exist"),
])
def test_dot_dot_through_a_missing_directory_or_a_file_is_refused_before_the_run(here, capsys, monkeypatch, where,
                                                                                  path, reason):
    path = path.format(ext="json" if where == "--out" else "png")
    other = ["--plot", "c.png"] if where == "--out" else ["--out", "r.json"]
    refused(["em-vs-sgd", "--seeds", "1", *S, where, path, *other], capsys, monkeypatch, where, repr(path), reason)
    assert sorted(os.listdir(here)) == ["afile", "d"]


def test_the_file_lands_where_the_os_resolves_dot_dot(here, capsys):
    """Through a symlinked directory, 'link/..' is the parent of the link's target, not the
    directory holding the link: the check and the write both go there, and the summary names the
    path as given."""
    (here / "d" / "sub").mkdir()
    os.symlink("d/sub", "lnk")
    code, out, err = cli_run(["em-vs-sgd", "--seeds", "1", *S, "--out", "lnk/../r.json"], capsys)
    assert code == 0, err
    assert json.loads((here / "d" / "r.json").read_text())["seeds"] == [0]
    assert not (here / "r.json").exists()
    assert "wrote lnk/../r.json" in out
    assert sorted(os.listdir(here / "d")) == ["r.json", "sub"]  # no probe or temp file left


def test_check_output_path_returns_the_file_the_os_would_write(here):
    (here / "d" / "sub").mkdir()
    os.symlink("d/sub", "lnk")
    os.symlink("lnk/../x.json", "to_x")  # a link whose text has '..' after a symlinked directory
    real = os.path.realpath(here)
    assert _io.check_output_path("lnk/../r.json") == os.path.join(real, "d", "r.json")
    assert _io.check_output_path("to_x") == os.path.join(real, "d", "x.json")
    assert _io.check_output_path("d/./r.json") == os.path.join(real, "d", "r.json")
    for bad in ("afile/../r.json", "d/../nonexist/../r.json", "to_nothing/../r.json"):
        with pytest.raises(ValueError, match="directory"):
            _io.check_output_path(bad)


def test_link_whose_text_passes_through_a_file_is_refused(here, capsys, monkeypatch):
    os.symlink("afile/../r.json", "bad_link")
    refused(["em-vs-sgd", "--seeds", "1", *S, "--out", "bad_link"], capsys, monkeypatch, "--out", "not a directory")
    assert os.path.islink("bad_link") and not os.path.exists("r.json")


# --------------------------------------------------------------------------------------------
# --out and --plot naming one file, however it is named
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, out, plot", [
    (lambda: os.symlink(".", "dl"), "r3.png", "dl/r3.png"),  # a symlinked directory, the file not there yet
    (lambda: os.symlink(".", "dl"), "dl/dl/r3.png", "r3.png"),
    (lambda: None, "d/../r3.png", "r3.png"),
    (lambda: None, "./r3.png", "r3.png"),
    (lambda: (open("r3.png", "w").close(), os.link("r3.png", "hard.png")), "r3.png", "hard.png"),  # a hard link
    (lambda: (open("r3.png", "w").close(), os.symlink(".", "dl")), "dl/r3.png", "r3.png"),
])
def test_out_and_plot_naming_one_file_by_any_route_are_refused(here, capsys, monkeypatch, make, out, plot):
    make()
    before = sorted(os.listdir(here))
    refused(["em-vs-sgd", "--seeds", "1", *S, "--out", out, "--plot", plot], capsys, monkeypatch,
            "--out", "--plot", "same file")
    assert sorted(os.listdir(here)) == before


def test_out_and_plot_in_two_directories_are_accepted(here, capsys, monkeypatch):
    accepted(["em-vs-sgd", "--seeds", "1", *S, "--out", "d/r.png", "--plot", "r.png"], capsys, monkeypatch)


# --------------------------------------------------------------------------------------------
# Outputs inside --checkpoint-dir
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("where, path", [
    ("--out", "ck/manifest.json"),
    ("--out", "ck/chunk-0123abcd.npz"),
    ("--plot", "ck/c.png"),
    ("--out", "ckl/r.json"),  # through a symlink to the checkpoint directory
    ("--plot", "d/../ck/c.png"),
])
def test_outputs_inside_the_checkpoint_directory_are_refused(here, capsys, monkeypatch, exists, where, path):
    (here / "ck").mkdir()
    os.symlink("ck", "ckl")
    if exists:  # a directory of an earlier run of the same command
        (here / "ck" / "manifest.json").write_text("{}")
    other = ["--plot", "c.png"] if where == "--out" else ["--out", "r.json"]
    refused(["em-vs-sgd", "--seeds", "1", *S, "--checkpoint-dir", "ck", where, path, *other], capsys, monkeypatch,
            where, "--checkpoint-dir", "inside")
    assert (here / "ck" / "manifest.json").exists() == exists


@pytest.mark.parametrize("checkpoint_dir, out", [
    ("ck", "ck"),  # the directory not there yet: --out would take its name
    ("r.json/ck", "r.json"),  # the checkpoint directory would be made inside the results' path
    ("ckl/new", "d/new"),  # through a symlink, neither there yet
    ("d/new", "ckl/new/r.json"),
])
def test_outputs_and_a_checkpoint_directory_not_there_yet_are_compared_as_resolved(here, capsys, monkeypatch,
                                                                                   checkpoint_dir, out):
    os.symlink("d", "ckl")
    if out.endswith("r.json"):
        (here / "d" / "new").mkdir()  # --out's directory must exist; the checkpoint directory is still empty
    refused(["em-vs-sgd", "--seeds", "1", *S, "--checkpoint-dir", checkpoint_dir, "--out", out], capsys, monkeypatch,
            "--out", "--checkpoint-dir")


def test_outputs_beside_the_checkpoint_directory_are_accepted(here, capsys, monkeypatch):
    accepted(["em-vs-sgd", "--seeds", "1", *S, "--checkpoint-dir", "ck", "--out", "ck.json", "--plot", "d/ck.png"],
             capsys, monkeypatch)


@pytest.mark.parametrize("checkpoint_dir, reason", [
    ("afile/../ck", ("'afile'", "not a directory")),
    ("afile/ck", ("'afile'", "not a directory")),
    ("x/../ck", ("'x'", "does not exist", "'..'")),  # the OS cannot resolve it: the '..' follows a missing part
    ("d/../nonexist/x/../../afile/ck", ("'d/../nonexist'", "does not exist")),
])
def test_checkpoint_dir_the_os_cannot_resolve_is_refused_before_the_run(here, capsys, monkeypatch, checkpoint_dir,
                                                                        reason):
    """The one line names the option, the part of the path at fault (quoted) and why it is at fault."""
    refused(["em-vs-sgd", "--seeds", "1", *S, "--checkpoint-dir", checkpoint_dir], capsys, monkeypatch,
            "--checkpoint-dir", *reason)
    assert sorted(os.listdir(here)) == ["afile", "d"]


# --------------------------------------------------------------------------------------------
# Each option once, spelled out
# --------------------------------------------------------------------------------------------

_VALUES = ["2", "0.5", "1,2", "h:1", "reference", "dense", "cosine", "em_like", "x.png", "small", "gpt"]


def _options(parser):
    """(command, its option) for every option of every command, switches included."""
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                yield name, action


def _valid_value(parser, capsys, head, option, nargs):
    """A value that ``option`` takes (none for a switch)."""
    if nargs == 0:
        return []
    for value in _VALUES:
        try:
            parser.parse_args([*head, option, value])
            return [value]
        except SystemExit:
            capsys.readouterr()
    pytest.fail(f"no valid value for {head} {option}")


def test_every_option_given_twice_is_refused(here, capsys):
    parser = cli.build_parser()  # one parser parses many command lines, as argparse allows
    seen = 0
    for name, action in _options(parser):
        option = action.option_strings[0]
        head = {"rerun": ["rerun", "r.json"], "windtunnel-probe": ["windtunnel-probe", "m"]}.get(name, [name])
        value = _valid_value(parser, capsys, head, option, action.nargs)
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*head, option, *value, option, *value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, (name, option, err)
        assert f"argument {option}:" in err and "more than once" in err, (name, option, err)
        seen += 1
    assert seen > 100  # every command's options


@pytest.mark.parametrize("argv, option", [
    (["em-vs-sgd", "--seeds", "3", "--seeds", "4"], "--seeds"),
    (["em-vs-sgd", "--out", "a.json", "--out=b.json"], "--out"),
    (["deep", "--checkpoint-dir", "ck", "--checkpoint-dir", "ck"], "--checkpoint-dir"),  # even the same value
    (["deep", "--two-timescale", "--two-timescale"], "--two-timescale"),
])
def test_an_option_given_twice_stops_the_command(here, capsys, monkeypatch, argv, option):
    refused(argv + S, capsys, monkeypatch, option, "more than once")


@pytest.mark.parametrize("argv, needle", [
    (["em-vs-sgd", "--step", "5"], "--step"),
    (["em-vs-sgd", "--seed", "3"], "--seed"),
    (["em-vs-sgd", "--out=r.json", "--no-prog"], "--no-prog"),
    (["deep", "--two", "--value-lr-mult", "3"], "--two"),
    (["bijection", "--head-opt", "sgd"], "--head-opt"),
    (["laws-check", "--se", "1"], "--se"),
    (["rerun", "r.json", "--ou", "x.json"], "--ou"),
    (["--vers", "laws-check"], "--vers"),
])
def test_abbreviated_options_are_refused(here, capsys, monkeypatch, argv, needle):
    refused(argv, capsys, monkeypatch, "unrecognized arguments", needle)


@pytest.mark.parametrize("seed_list", ["3, 7", " 3,7", "3,7 ", "3 ,7", "3,\t7", "3,\u00a07"])
def test_seed_list_with_spaces_is_refused(here, capsys, monkeypatch, seed_list):
    refused(["em-vs-sgd", *S, "--seed-list", seed_list], capsys, monkeypatch, "--seed-list", "spaces")


# --------------------------------------------------------------------------------------------
# An option that another option's value makes idle
# --------------------------------------------------------------------------------------------

DEEP = ["--seeds", "1", "--steps", "4", "--seq-len", "16", "--d-model", "8", "--n-layers", "1", "--n-heads", "2",
        "--no-progress"]
BIJECTION = ["--seeds", "1", "--steps", "4", "--batch", "2", "--heldout", "2", "--n-symbols", "3", "--d-model", "8",
             "--n-layers", "1", "--n-heads", "2", "--no-progress"]


@pytest.mark.parametrize("command, args, idle, needs", [
    ("bijection", ["--head-optimizer", "sgd", "--head-value-lr", "0.2"], "--head-value-lr", "--head-optimizer"),
    ("bijection", ["--head-value-lr", "0.2"], "--head-value-lr", "--head-optimizer"),  # adam, the default
    ("bijection", ["--head-value-lr", "0.5", "--head-optimizer", "adam"], "--head-value-lr", "--head-optimizer"),
    ("deep", ["--value-lr-multiplier", "10"], "--value-lr-multiplier", "--two-timescale"),
    ("deep", ["--n-checkpoints", "0", "--settle-tol", "0.1"], "--settle-tol", "--n-checkpoints"),
    ("deep", ["--settle-rows", "64", "--n-checkpoints", "0"], "--settle-rows", "--n-checkpoints"),
    ("em-vs-sgd", ["--embeddings", "reference", "--n-symbols", "8"], "--n-symbols", "--embeddings"),
    ("plateau", ["--d-embed", "20", "--embeddings", "reference"], "--d-embed", "--embeddings"),
    ("deep", ["--embeddings", "means.npy", "--n-symbols", "3"], "--n-symbols", "--embeddings"),
])
def test_an_option_without_effect_is_refused_naming_both(here, capsys, monkeypatch, command, args, idle, needs):
    import numpy as np

    np.save(here / "means.npy", np.ones((3, 4)))
    base = {"deep": DEEP, "bijection": BIJECTION}.get(command, ["--seeds", "1", *S])
    err = refused([command, *base, *args], capsys, monkeypatch, idle, needs, "no effect")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command, args", [
    ("bijection", ["--head-optimizer", "em_like", "--head-value-lr", "0.2"]),
    ("bijection", ["--head-optimizer", "sgd"]),
    ("deep", ["--two-timescale", "--value-lr-multiplier", "10"]),
    ("deep", ["--n-checkpoints", "2", "--settle-tol", "0.2", "--settle-rows", "4"]),
    ("deep", ["--settle-tol", "0.2"]),  # checkpoints by default
    ("deep", ["--n-checkpoints", "0"]),
    ("em-vs-sgd", ["--embeddings", "seed:3", "--n-symbols", "4", "--d-embed", "5"]),  # drawn means take the sizes
    ("em-vs-sgd", ["--n-symbols", "8"]),
])
def test_an_option_with_effect_is_accepted(here, capsys, monkeypatch, command, args):
    base = {"deep": DEEP, "bijection": BIJECTION}.get(command, ["--seeds", "1", *S])
    accepted([command, *base, *args], capsys, monkeypatch)


def test_rerun_plot_of_an_experiment_without_a_figure_is_refused(here, capsys, monkeypatch):
    result = {"experiment": "plateau", "config": PlateauConfig(steps=4, checkpoint_every=2, plateau_window=2).to_dict(),
              "seeds": [0], "chunk_size": None}
    (here / "p.json").write_text(json.dumps(result))
    refused(["rerun", "p.json", "--plot", "p.png", "--no-progress"], capsys, monkeypatch, "--plot", "plateau")
    accepted(["rerun", "p.json", "--out", "q.json", "--no-progress"], capsys, monkeypatch)
