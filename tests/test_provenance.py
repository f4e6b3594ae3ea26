"""The provenance record written with every result."""

import datetime as dt
import json
import platform
import subprocess
import time

import jax

import gradattn
from gradattn.provenance import cpu_model, finish, git_state, provenance


def test_fields_and_types():
    start = time.time()
    prov = provenance()
    assert json.loads(json.dumps(prov)) == prov
    v = prov["versions"]
    assert v["gradattn"] == gradattn.__version__
    assert v["jax"] == jax.__version__ and v["jaxlib"] is not None and v["optax"] and v["flax"]
    assert v["python"] == platform.python_version()
    assert prov["backend"] == jax.default_backend()
    assert prov["devices"] == {
        "platform": jax.devices()[0].platform,
        "kind": jax.devices()[0].device_kind,
        "count": len(jax.devices()),
    }
    assert prov["cpu"] is None or (isinstance(prov["cpu"], str) and prov["cpu"])
    started = dt.datetime.fromisoformat(prov["start_time"])
    assert started.tzinfo is not None and started.utcoffset() == dt.timedelta(0)
    assert abs(prov["start_timestamp"] - start) < 60


def test_finish_adds_wall_time():
    prov = provenance(start_time=1000.0)
    assert prov["start_time"] == "1970-01-01T00:16:40+00:00"
    out = finish(prov, end_time=1012.5)
    assert out is prov and prov["wall_time_s"] == 12.5 and prov["end_time"] == "1970-01-01T00:16:52+00:00"
    now = finish(provenance())
    assert 0 <= now["wall_time_s"] < 60
    json.dumps(now)


def test_git_state_of_this_checkout_and_outside_one(tmp_path):
    state = git_state()
    pkg_dir = gradattn.__path__[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg_dir, capture_output=True, text=True)
    if head.returncode == 0:
        assert state["commit"] == head.stdout.strip() and len(state["commit"]) == 40
        assert isinstance(state["dirty"], bool)
    else:
        assert state == {"commit": None, "dirty": None}
    assert git_state(str(tmp_path)) == {"commit": None, "dirty": None}


def test_git_state_sees_a_dirty_tree(tmp_path):
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, check=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    clean = git_state(str(tmp_path))
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert git_state(str(tmp_path)) == {"commit": clean["commit"], "dirty": True}


def test_cpu_model_reads_proc_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
    except OSError:
        names = []
    if names:
        assert cpu_model() == names[0]
    else:
        assert cpu_model() == (platform.processor() or None)
