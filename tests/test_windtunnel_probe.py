"""The probe command on saved wind-tunnel models: its JSON holds every seed's statistics, the
summary is their mean, the position-only control is exact where the entropy is a function of the
position, and bad input is refused before any work."""

import json

import numpy as np
import pytest

from _cli import cli_run

TINY = ["--steps", "6", "--warmup", "1", "--batch", "4", "--heldout", "4", "--V", "4", "--L", "3", "--d-model", "8",
        "--n-layers", "2", "--n-heads", "2", "--no-progress"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    code = __import__("gradattn.cli", fromlist=["main"]).main(
        ["windtunnel-bijection", "--seeds", "2", "--save-dir", str(d / "m"), *TINY])
    assert code == 0
    return d / "m"


def test_probe_command_json_summary_and_controls(saved, tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, err = cli_run(["windtunnel-probe", str(saved), "--sequences", "32", "--ablation-sequences", "8",
                                 "--out", str(out), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    assert "layer-0 key cosines" in stdout and "position-only predictor" in stdout
    r = json.loads(out.read_text())
    assert r["seeds"] == [0, 1] and r["provenance"]["command"]
    per = r["per_seed"]
    for which in ("trained", "untrained"):
        pc1 = np.asarray([e[which]["manifold"]["pc1_share"] for e in per])  # (seeds, layers + 1)
        assert pc1.shape == (2, 3) and np.all((pc1 > 0) & (pc1 <= 1))
        np.testing.assert_allclose(r["summary"][which]["pc1_share"]["mean"], pc1.mean(axis=0), rtol=1e-12)
    # without replacement the exact entropy is log2(V - t + 1) at the t-th key: a function of the position
    assert r["summary"]["position_only_r2_test"]["mean"] == pytest.approx(1.0, abs=1e-5)
    heads = np.asarray(per[0]["ablation"]["head_delta_bits"])
    assert heads.shape == (2, 2) and np.all(np.isfinite(heads))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_probe_command_refuses_bad_input(saved, tmp_path, capsys):
    code, _, err = cli_run(["windtunnel-probe", str(tmp_path)], capsys)
    assert code == 2 and "no config.json" in err
    code, _, err = cli_run(["windtunnel-probe", str(saved), "--sequences", "4", "--ablation-sequences", "8"], capsys)
    assert code == 2 and "--ablation-sequences" in err
    code, _, err = cli_run(["windtunnel-probe", str(saved), "--sequences", "1"], capsys)
    assert code == 2 and "--sequences" in err
