"""Writes that fail part way: a checkpoint directory whose disk fills up or turns read-only mid-sweep
keeps every finished chunk whole and resumes; a persistent compilation cache left with partial
entries by a full disk recovers, and says so in at most one line."""

import errno
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli import TINY, cli_run

from gradattn import cluster, resume
from gradattn.cluster import cluster_sweep
from gradattn.sweeps import sweep


def fn(key):
    a = jax.random.normal(key, (4, 4))
    return {"h": jnp.tanh(a @ a).sum(0), "pos": (a > 0).sum()}


FP = {"config": {"steps": 4}, "task": "test", "version": "0"}
SEEDS = list(range(8))


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


def chunks(d) -> list[str]:
    return [f for f in listing(d) if f.startswith("chunk-")]


def stamps(d) -> dict:
    return {f: (os.stat(os.path.join(d, f)).st_ino, os.stat(os.path.join(d, f)).st_mtime_ns) for f in chunks(d)}


class Fault:
    """A file system that fails the writes of chunk files in one directory after ``after`` of them:
    ``full`` (ENOSPC when the data is flushed, after the temp file was written) or ``read-only``
    (EROFS when the temp file is created)."""

    def __init__(self, monkeypatch, directory, kind: str, after: int = 2):
        self.directory, self.kind, self.after, self.chunks = os.path.abspath(directory), kind, after, 0
        self._open, self._fsync = os.open, os.fsync
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def _ours(self, path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return os.path.dirname(path) == self.directory and os.path.basename(path).startswith(".chunk-")

    def open(self, path, flags, *args, **kwargs):
        if self._ours(path):
            if self.chunks >= self.after and self.kind == "read-only":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            self.chunks += 1
        return self._open(path, flags, *args, **kwargs)

    def fsync(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if self._ours(path) and self.chunks > self.after and self.kind == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fsync(fd)


def computed_seeds(monkeypatch) -> list[int]:
    """The seeds cluster_sweep hands to sweep from now on (appended to the returned list)."""
    seen: list[int] = []
    real = cluster.sweep

    def recording(f, keys, **kwargs):
        seen.extend(int(k[1]) for k in np.asarray(jax.random.key_data(keys)))  # seeds < 2^32: key data [0, s]
        return real(f, keys, **kwargs)

    monkeypatch.setattr(cluster, "sweep", recording)
    return seen


@pytest.fixture(scope="module")
def expected():
    return sweep(fn, SEEDS, chunk_size=1)


@pytest.mark.parametrize("kind, code", [("full", errno.ENOSPC), ("read-only", errno.EROFS)])
def test_failed_chunk_write_keeps_the_finished_chunks_and_a_rerun_resumes(tmp_path, monkeypatch, expected, kind, code):
    d = str(tmp_path / "ck")
    with monkeypatch.context() as m:
        Fault(m, d, kind, after=2)
        with pytest.raises(resume.CheckpointWriteError) as info:
            cluster_sweep(fn, SEEDS, chunk_size=1, checkpoint_dir=d, fingerprint=FP)
    err = info.value
    assert isinstance(err, OSError) and err.errno == code and err.directory == d
    message = str(err)
    assert "\n" not in message and repr(d) in message and os.strerror(code) in message, message
    assert "2 finished chunk files already there are kept" in message, message
    # two chunks whole, the manifest, and nothing else: no temp file, no partial chunk
    assert listing(d) == sorted(chunks(d) + ["manifest.json"]) and len(chunks(d)) == 2
    kept = stamps(d)
    store = resume.open_store(d, json.load(open(os.path.join(d, "manifest.json"))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chunk that cannot be read is a warning
        assert len(store.load()) == 2

    seen = computed_seeds(monkeypatch)
    out = cluster_sweep(fn, SEEDS, chunk_size=1, checkpoint_dir=d, fingerprint=FP)
    assert out.keys() == expected.keys()
    for k in out:
        assert out[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(out[k], expected[k], err_msg=k)  # bit for bit
    assert seen == SEEDS[2:]  # only the seeds not on disk were computed
    assert {f: stamps(d)[f] for f in kept} == kept and len(chunks(d)) == 8  # read, not rewritten


def test_manifest_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    d.mkdir()
    real = resume._write_replace

    def full(path, data):
        if os.path.basename(path) == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(resume, "_write_replace", full)
    with pytest.raises(resume.CheckpointWriteError, match=r"^cluster_sweep: cannot write manifest\.json in checkpoint_dir .*"
                       r"No space left on device \(ENOSPC\); nothing was computed$"):
        cluster_sweep(fn, SEEDS, chunk_size=1, checkpoint_dir=str(d), fingerprint=FP)
    assert listing(d) == []


def test_damaged_chunk_in_a_read_only_directory_is_one_line(tmp_path, monkeypatch, expected):
    d = str(tmp_path / "ck")
    cluster_sweep(fn, SEEDS[:2], chunk_size=1, checkpoint_dir=d, fingerprint=FP)
    victim = os.path.join(d, chunks(d)[0])
    open(victim, "wb").write(b"")
    real = os.unlink

    def read_only(path, *args, **kwargs):
        if os.path.abspath(path) == victim:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(resume.CheckpointWriteError, match=r"cannot remove the damaged chunk chunk-\w+\.npz \(no valid header"):
        cluster_sweep(fn, SEEDS[:2], chunk_size=1, checkpoint_dir=d, fingerprint=FP)


def test_cli_failed_checkpoint_write_is_one_line_exit_1_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "ck")
    base = ["em-vs-sgd", "--seeds", "8", "--checkpoint-dir", d] + TINY
    with monkeypatch.context() as m:
        Fault(m, d, "full", after=2)
        code, out, err = cli_run(base + ["--out", str(tmp_path / "a.json")], capsys)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and repr(d) in err and "No space left on device" in err, err
    assert not (tmp_path / "a.json").exists()  # an incomplete run writes no results
    assert len(chunks(d)) == 2 and listing(d) == sorted(chunks(d) + ["manifest.json"])
    kept = stamps(d)
    seen = computed_seeds(monkeypatch)
    code, _, err = cli_run(base + ["--out", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    assert seen == SEEDS[2:] and {f: stamps(d)[f] for f in kept} == kept
    code, _, err = cli_run(["em-vs-sgd", "--seeds", "8", "--out", str(tmp_path / "ref.json")] + TINY, capsys)
    assert code == 0, err
    resumed, ref = (json.load(open(tmp_path / f)) for f in ("b.json", "ref.json"))
    assert resumed["seeds"] == ref["seeds"] and resumed["per_seed"] == ref["per_seed"] and resumed["curves"] == ref["curves"]
