"""Writes that fail part way: a checkpoint directory whose disk fills up or turns read-only mid-sweep
keeps every finished chunk whole and resumes; a persistent compilation cache left with partial
entries by a full disk recovers, and says so in at most one line."""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli import TINY, cli_run
from _spawn import ROOT

from gradattn import _compile_cache, cluster, resume
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
        self.fds: set[int] = set()  # the open temp files of chunks
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
            fd = self._open(path, flags, *args, **kwargs)
            self.fds.add(fd)
            return fd
        return self._open(path, flags, *args, **kwargs)

    def fsync(self, fd):
        ours = fd in self.fds
        self.fds.discard(fd)
        if ours and self.chunks > self.after and self.kind == "full":
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
    assert re.search(r"\b2 finished chunk.*kept", message), message
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
    with pytest.raises(resume.CheckpointWriteError, match=r"^cluster_sweep: cannot write\b.*manifest\.json.*checkpoint_dir\b.*"
                       r"No space left on device \(ENOSPC\).*nothing\b.*computed$"):
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
    with pytest.raises(resume.CheckpointWriteError, match=r"^cluster_sweep: cannot remove\b.*damaged.*chunk-\w+\.npz.*no valid header"
                       r".*Read-only file system"):
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


# ---- the persistent compilation cache ----

CACHE_CONFIG = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def cache_config():
    """The compilation cache's settings (process-wide) and the warnings hook, as they were, afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    saved = {name: getattr(jax.config, name) for name in CACHE_CONFIG}
    showwarning, hook = warnings.showwarning, dict(_compile_cache._hook)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    warnings.showwarning = showwarning
    _compile_cache._hook.update(hook)


def entry(data: bytes = b"an executable") -> bytes:
    """A cache entry as JAX writes it: a 4-byte compile time, the executable, compressed."""
    from jax._src.compilation_cache import combine_executable_and_time, compress_executable

    return compress_executable(combine_executable_and_time(data * 50, 1))


def test_partial_cache_entries_are_removed_and_whole_ones_kept(tmp_path):
    whole = entry()
    files = {
        "jit_a-1-cache": whole,
        "jit_b-2-cache": b"",  # a write that found the disk full
        "jit_c-3-cache": whole[: len(whole) // 2],  # a write cut short
        "jit_d-4-cache": b"not compressed",
        "jit_b-2-atime": b"\0" * 8,  # the access time of a partial entry goes with it
        "jit_a-1-atime": b"\0" * 8,
        ".lockfile": b"",
        "notes.txt": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    removed = _compile_cache.remove_partial_entries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == ["jit_b-2-cache", "jit_c-3-cache", "jit_d-4-cache"]
    assert sorted(os.listdir(tmp_path)) == sorted([".gradattn-checked", ".lockfile", "jit_a-1-atime", "jit_a-1-cache",
                                                   "notes.txt"])


def test_cache_entries_are_read_once(tmp_path, monkeypatch):
    """Entries checked before are not read again: a large cache costs a directory listing."""
    hour_ago = os.stat(tmp_path).st_mtime_ns - 3600 * 10**9
    for i in range(3):
        (tmp_path / f"jit_{i}-{i}-cache").write_bytes(entry())
        os.utime(tmp_path / f"jit_{i}-{i}-cache", ns=(hour_ago, hour_ago))
    read = []
    real = _compile_cache._readable
    monkeypatch.setattr(_compile_cache, "_readable", lambda data: read.append(len(data)) or real(data))
    assert _compile_cache.remove_partial_entries(tmp_path) == [] and len(read) == 3
    assert _compile_cache.remove_partial_entries(tmp_path) == [] and len(read) == 3
    (tmp_path / "jit_new-9-cache").write_bytes(entry()[:10])  # written since: read, and removed
    assert [os.path.basename(p) for p in _compile_cache.remove_partial_entries(tmp_path)] == ["jit_new-9-cache"]
    assert len(read) == 4


def test_enable_turns_the_cache_on_and_shows_one_line_of_cache_errors(tmp_path, cache_config, capsys):
    d = tmp_path / "cache"
    others = []
    warnings.showwarning = lambda message, *args, **kwargs: others.append(str(message))  # what shows the rest
    assert _compile_cache.enable(d)
    assert jax.config.jax_compilation_cache_dir == str(d)  # type: ignore[attr-defined]
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.ones(3)).block_until_ready()
    assert [f for f in os.listdir(d) if f.endswith("-cache")]  # the program was kept
    for name in ("jit_a", "jit_b", "jit_c"):
        warnings.warn(f"Error reading persistent compilation cache entry for '{name}': error: Error -5 while\n"
                      "decompressing data: incomplete or truncated stream", stacklevel=1)
    warnings.warn("something else", stacklevel=1)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert str(d) in err and "'jit_a'" in err and "incomplete or truncated stream" in err, err
    assert others == ["something else"]  # other warnings are shown as before
    (tmp_path / "file").write_text("")
    assert not _compile_cache.enable(tmp_path / "file" / "cache")  # cannot be created: left off


CACHE_RUN = textwrap.dedent(
    """
    import resource
    import signal
    import sys

    import jax
    import jax.numpy as jnp

    from gradattn import _compile_cache

    path, limit = sys.argv[1], int(sys.argv[2])
    assert _compile_cache.enable(path)
    if limit >= 0:  # files cannot grow past `limit` bytes: every entry written from now on is cut there
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for i in range(6):
        jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x))(jnp.ones(3)).block_until_ready()
    """
)


def test_cache_recovers_from_a_full_disk_and_says_so_in_one_line(tmp_path):
    """Writes cut short (as by a full disk) leave empty and truncated entries; each run prints at
    most one line about it, the next run removes them, and a run with room again keeps whole ones."""
    d = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "GRADATTN_NO_COMPILATION_CACHE"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def run(limit: int) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", CACHE_RUN, str(d), str(limit)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr.splitlines()

    def sizes() -> dict[str, int]:
        return {f: os.path.getsize(d / f) for f in os.listdir(d) if f.endswith("-cache")}

    lines = run(0)  # no room at all: every entry left empty
    assert len(lines) == 1 and "File too large" in lines[0] and str(d) in lines[0], lines
    empty = sizes()
    assert len(empty) >= 6 and set(empty.values()) == {0}
    lines = run(200)  # room for 200 bytes of each: the empty ones removed, new ones truncated
    assert len(lines) == 1 and "File too large" in lines[0], lines
    cut = sizes()
    assert cut.keys() == empty.keys() and set(cut.values()) == {200}
    assert run(-1) == []  # room again: the truncated ones removed and written whole, nothing to say
    whole = sizes()
    assert whole.keys() == empty.keys() and all(size > 200 for size in whole.values())
    assert all(_compile_cache._readable((d / f).read_bytes()) for f in whole)
