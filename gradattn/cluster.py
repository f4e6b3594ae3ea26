"""Seed sweeps over several processes (hosts), and sweeps that resume after being stopped.

Multi-process JAX runs one Python process per host (or per GPU), each with its local devices,
joined by JAX's distributed runtime. :func:`initialize` joins that runtime (explicitly with a
coordinator address, or by JAX's own detection of a SLURM or Open MPI job); in a plain single
process it does nothing, so the same program runs unchanged on a laptop and on a cluster.

:func:`cluster_sweep` is :func:`gradattn.sweeps.sweep` over every process of the run:

* The seeds still to compute are cut into calls of ``chunk_size * n_local_devices`` seeds (in
  seed order), handed to the processes in turn (round-robin), and each call is computed by
  :func:`gradattn.sweeps.sweep` on that process's local devices. Each call keeps ``chunk_size``
  seeds per device, the shape that makes a seed's result depend only on ``fn``, its key and
  ``chunk_size`` (see :mod:`gradattn.sweeps`): the gathered results are bit-identical to a
  single-process ``sweep`` with the same ``chunk_size``, whatever the number of processes and
  devices. In one process without a checkpoint the calls are exactly ``sweep``'s.
* The results are gathered, in seed order, onto **every** process with JAX's collectives
  (an all-gather of a global array over one device of each process; on CPU over gloo), so
  processes may have different numbers of local devices. Only the
  primary process (:func:`is_primary`) should write files or plots.
* With ``checkpoint_dir`` every finished call is written to disk at once (:mod:`gradattn.resume`:
  atomic, checksummed, refused if written by another ``fingerprint``); a rerun loads the seeds
  already there and computes only the others. The directory may be shared by the processes (a
  network file system) or be each host's own: the processes agree on what is on disk through a
  collective before computing, and a seed found by several is taken from the first.
* A process that is lost stops the others, each with one line naming the cause and exit status
  :data:`PEER_LOST_EXIT` (3), not with JAX's own abort. With an explicit coordinator the
  processes keep the connections of their start-up handshake (:func:`initialize`) open, process 0
  to each other one, and watch them from a thread: a process that dies (SIGKILL, a crash, Ctrl-C)
  closes its connection, and one that leaves before the sweep has ended says so, so the others
  see it at once, whether they are waiting in a collective or computing, and end there (process
  0 first telling the others), as they do when a collective fails first: one line on stderr,
  then ``os._exit``, without JAX's distributed shutdown (which would wait for the lost process
  and then abort with a C++ stack trace). A loss seen while no sweep runs ends the process when
  it exits, with the same line and status. Everything finished is in the checkpoint directory.
  A host that is cut off (no connection closes), and runs whose processes JAX detects under
  SLURM or MPI (no handshake, so only a failed collective is seen), are left to JAX's runtime,
  which ends the others itself within ``heartbeat_timeout``, with its own message. The sweep runs
  in rounds (one call per process each) with one tiny collective per round (the count of seeds
  done, which the progress bar shows), so no process runs far ahead of a lost one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import os
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradattn import resume
from gradattn._checks import check_int
from gradattn._io import check_directory
from gradattn._progress import StepBar
from gradattn.sweeps import default_chunk_size, seed_keys, sweep, ticked_step_count

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>[0-9]{1,5})$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")

PEER_LOST_EXIT = 3
"""The exit status of a process that stopped because another process of the run died, was stopped
or left before the sweep ended (see the module docstring)."""


def _split_coordinator(coordinator: str, fn: str) -> tuple[str, int]:
    """``(host, port)`` of a well-formed ``HOST:PORT`` (IPv6 without brackets); ValueError otherwise."""
    if not isinstance(coordinator, str):
        raise TypeError(f"{fn}: coordinator must be a 'HOST:PORT' string, got {coordinator!r} of type {type(coordinator).__name__}")
    m = _HOST_PORT.match(coordinator)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        raise ValueError(
            f"{fn}: coordinator must be HOST:PORT (e.g. 'node001:12345', '10.0.0.1:12345' or '[fe80::1]:12345', "
            f"a port in 1..65535), got {coordinator!r}"
        )
    port = int(m.group("port"))
    if m.group("v6") is not None:
        try:
            ipaddress.IPv6Address(m.group("v6"))
        except ValueError:
            raise ValueError(f"{fn}: coordinator must be HOST:PORT; [{m.group('v6')}] is not a valid IPv6 address "
                             f"(in {coordinator!r})") from None
        return m.group("v6"), port
    host = m.group("host")
    if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: an IPv4 address or nothing
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{fn}: coordinator must be HOST:PORT; {host!r} is not a valid IPv4 address "
                             f"(in {coordinator!r})") from None
    elif len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.removesuffix(".").split(".")):
        raise ValueError(f"{fn}: coordinator must be HOST:PORT; {host!r} is not a valid host name "
                         f"(letters, digits and inner hyphens, in dot-separated labels of 1..63) (in {coordinator!r})")
    return host, port


def check_coordinator(coordinator: str, fn: str = "initialize") -> str:
    """``coordinator`` if it is ``HOST:PORT`` (a host name, a valid IPv4 address, or ``[IPv6]``; a
    port in 1..65535); ValueError (TypeError for a non-string) naming ``fn`` otherwise. Only the
    form is checked here; :func:`initialize` resolves the host."""
    _split_coordinator(coordinator, fn)
    return coordinator


_JOIN = "gradattn-join 1"
"""The first word of every line of the start-up handshake (:func:`_serve_join`, :func:`_ask_join`)."""
_ANSWER_S = 30.0
"""Seconds a process waits for process 0's first answer once connected (it answers at once)."""
_NOTICE_S = 5.0
"""Seconds a process 0 that stops for a lost process waits for the others to take the notice and go."""


class _Run:
    """This process's view of the run it joined with an explicit coordinator (module state).

    ``peers``: the handshake connections, kept open for the run's lifetime (process 0: one to every
    other process; the others: one to process 0), watched by a daemon thread: a connection that
    closes without a goodbye is a process that died (SIGKILL, a crash, Ctrl-C), seen at once,
    wherever this process is. ``started``/``done``: the cross-process gathers begun and finished
    here; a process says goodbye with its ``done``, so a goodbye with fewer than this process has
    begun is a process that left before the sweep ended. ``busy``: inside :func:`cluster_sweep`
    (or joining): a loss then ends this process at once (its main thread may be waiting on the
    lost process, or computing what no one will gather); outside, it ends at exit.
    """

    lock = threading.Lock()
    me = 0
    peers: dict[int, socket.socket] = {}  # noqa: RUF012 (module state, one run per process)
    byes: dict[int, int] = {}  # noqa: RUF012
    started = 0
    done = 0
    busy = 0
    checkpoint_dir: str | None = None
    lost: str | None = None  # why this process stops, once a process of the run is lost
    ending = False  # a thread is ending the process now (the line is out or going out): others wait
    exiting = False  # this process is ending normally: the others' goodbyes and closings are expected


def _kept() -> str:
    d = _Run.checkpoint_dir
    return (f"the chunks finished so far are kept in {d!r}, and rerunning the same command computes only the others"
            if d is not None else "nothing was kept (no checkpoint directory)")


def _gone(why: str) -> None:
    """A process of the run is lost (seen by the watch thread): end now if busy or already in JAX's
    shutdown (which would wait for the lost process, then abort), else at exit."""
    with _Run.lock:
        if _Run.lost is not None:
            return
        _Run.lost = why
        if not (_Run.busy or _Run.exiting):
            return  # nothing waits on the others now: the exit handler ends the process, with this line
        _Run.ending = True
    _end_lost(why)


def _lost_now(why: str) -> NoReturn:
    """End this process now for a lost process (seen by the main thread); if another thread is
    already doing so, wait for it."""
    with _Run.lock:
        ending = _Run.ending
        _Run.ending = True
        if _Run.lost is None:
            _Run.lost = why
        why = _Run.lost
    if ending:
        threading.Event().wait()
    _end_lost(why)


def _end_lost(why: str) -> NoReturn:
    """Print the one line of ``why``, tell the others (process 0), and end the process with
    :data:`PEER_LOST_EXIT`, without JAX's distributed shutdown (which would wait for the lost
    process and then abort with a C++ stack trace). What JAX's dying runtime may log after that
    line (its own view of the same loss, racing with this one) is dropped."""
    err = 2
    with contextlib.suppress(OSError):  # first of all, before that runtime logs its own view
        err = os.dup(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(err, f"gradattn: error: {_one_line(why, 2000)}; {_kept()}\n".encode(errors="replace"))
    if _Run.me == 0 and _Run.peers:  # the coordinator goes with this process: tell the others first
        for conn in list(_Run.peers.values()):
            _send(conn, {"lost": str(_Run.lost).split(": ", 1)[-1]})
        deadline = time.monotonic() + _NOTICE_S
        while time.monotonic() < deadline and not all(_drained(c) for c in list(_Run.peers.values())):
            time.sleep(0.05)
    os._exit(PEER_LOST_EXIT)


def _at_exit() -> None:
    """At exit, before JAX's own handler (registered earlier, so run later): after a lost process,
    end without JAX's shutdown (see :func:`_end_lost`); otherwise say goodbye to the others, with
    the number of gathers done, and let JAX shut down as usual."""
    with _Run.lock:
        _Run.exiting = True
        why = _Run.lost
        ending = _Run.ending
    if ending:
        threading.Event().wait()  # another thread is ending the process
    if why is not None:
        _end_lost(why)
    for conn in list(_Run.peers.values()):
        _send(conn, {"bye": _Run.done})


def _watch() -> None:
    """The watch thread: reads the peers' connections until each says goodbye and closes."""
    sel = selectors.DefaultSelector()
    pending: dict[int, bytearray] = {}
    for i, conn in _Run.peers.items():
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, i)
        pending[i] = bytearray()
    while sel.get_map():
        for key, _ in sel.select(timeout=1.0):
            i = key.data
            conn = _Run.peers[i]
            try:
                data = conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                if i not in _Run.byes:
                    name = "process 0 of the run (the coordinator)" if i == 0 else f"process {i} of the run"
                    _gone(f"cluster: {name} died or was stopped (its connection to process {_Run.me} closed without a "
                          f"goodbye; see its log)")
                continue
            pending[i] += data
            while b"\n" in pending[i]:
                end = pending[i].index(b"\n")
                try:
                    message = json.loads(bytes(pending[i][:end]))
                except ValueError:
                    message = {}
                del pending[i][: end + 1]
                if isinstance(message.get("bye"), int):
                    _Run.byes[i] = message["bye"]
                    if _Run.byes[i] < _Run.started:
                        _gone(f"cluster: process {i} left the run before the sweep ended (see its log)")
                elif "lost" in message:
                    _gone(f"cluster: process 0 stopped the run: {_one_line(message['lost'], 600)}")


def _start_watch(me: int, peers: dict[int, socket.socket]) -> None:
    _Run.me, _Run.peers, _Run.byes = me, peers, {}
    for conn in peers.values():
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    threading.Thread(target=_watch, name="gradattn-cluster-watch", daemon=True).start()


@contextlib.contextmanager
def _busy(checkpoint_dir: str | None = None):
    """While inside: a lost process ends this one at once (see :class:`_Run`)."""
    with _Run.lock:
        _Run.busy += 1
        _Run.checkpoint_dir = checkpoint_dir
        lost = _Run.lost
    try:
        if lost is not None:  # lost while this process was elsewhere
            _lost_now(lost)
        yield
    finally:
        with _Run.lock:
            _Run.busy -= 1


def _one_line(text: object, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(dict(message, join=_JOIN)) + "\n").encode())


def _receive(conn: socket.socket, deadline: float, pending: bytearray) -> dict | None:
    """The next handshake line on ``conn`` as a dict (``pending``: bytes received after the lines
    read so far); None if the peer closed first; ValueError if it is not a handshake line;
    TimeoutError at ``deadline``."""
    while b"\n" not in pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        try:
            part = conn.recv(4096)
        except TimeoutError:
            raise
        except OSError:
            return None
        if not part:
            return None
        pending += part
        if len(pending) > 65536:
            raise ValueError("too long")
    end = pending.index(b"\n")
    line = bytes(pending[:end])
    del pending[: end + 1]
    message = json.loads(line)  # a ValueError for anything else
    if not isinstance(message, dict) or message.get("join") != _JOIN:
        raise ValueError("not a handshake line")
    return message


def _resolve(host: str, port: int, timeout: float) -> None:
    """Check that ``host`` resolves (within ``timeout`` s): ValueError if it names no host,
    RuntimeError if the resolver fails or does not answer in time."""
    outcome: list = []

    def look_up():
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=look_up, name="gradattn-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise RuntimeError(f"initialize: the coordinator's host {host!r} could not be resolved within {timeout:g} s")
    if isinstance(outcome[0], socket.gaierror) and outcome[0].errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
        raise ValueError(f"initialize: the coordinator's host {host!r} is unknown ({_one_line(outcome[0].strerror or outcome[0])}); "
                         f"give a host name or address of process 0's host")
    if isinstance(outcome[0], OSError):
        raise RuntimeError(f"initialize: cannot resolve the coordinator's host {host!r}: {_one_line(outcome[0].strerror or outcome[0])}")


def _listen(port: int) -> socket.socket:
    """A listening socket where JAX's coordinator service will bind (``[::]:port``, every address,
    or ``JAX_COORDINATOR_BIND_ADDRESS``), or RuntimeError (one line) if that port cannot be served."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or f"[::]:{port}"
    host, _, bind_port = bind.rpartition(":")
    host = host.strip("[]")
    candidates = [(socket.AF_INET6, host)] if ":" in host else [(socket.AF_INET, host)]
    if host in ("::", ""):
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]  # a host without IPv6: every IPv4 address
    last: OSError | None = None
    for family, address in candidates:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            last = e
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed connection's TIME_WAIT is no user
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((address, int(bind_port)))
            s.listen(64)
            return s
        except OSError as e:
            s.close()
            last = e
            if e.errno == errno.EADDRINUSE:
                break
    assert last is not None
    if last.errno == errno.EADDRINUSE:
        raise RuntimeError(
            f"initialize: cannot serve the coordinator on port {bind_port}: the port is in use on this host (by another "
            f"program, or by another process given process id 0); choose a free port"
        )
    raise RuntimeError(f"initialize: cannot serve the coordinator at {bind}: {_one_line(last.strerror or last)}")


def _serve_join(listener: socket.socket, num_processes: int, timeout: int) -> dict[int, socket.socket]:
    """Process 0's side of the start-up handshake, before JAX's coordinator service starts.

    Waits (at most ``timeout`` s) for every other process to connect and say which process of how
    many it is; answers each at once, and once all are there tells them to go on. Processes given
    another count, or an id already taken, stop the run: every process then raises with the same
    line (ValueError). Connections that are not the handshake are dropped. Returns the
    connections, by process id, kept open to watch the others (:func:`_watch`).
    """
    deadline = time.monotonic() + timeout
    joined: dict[int, socket.socket] = {}
    problem: Exception | None = None
    try:
        while problem is None:
            if len(joined) == num_processes - 1:
                gone = [i for i, c in joined.items() if _closed(c)]  # started, then stopped while waiting
                for i in gone:
                    joined.pop(i).close()
                if not gone:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [i for i in range(1, num_processes) if i not in joined]
                problem = RuntimeError(
                    f"initialize: process(es) {missing} of {num_processes} did not join within {timeout} s (are they started, "
                    f"with this coordinator, and can they reach its port?)"
                )
                break
            listener.settimeout(min(left, 1.0))
            try:
                conn, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            try:
                hello = _receive(conn, min(deadline, time.monotonic() + 10), bytearray())
                n, i = hello["num_processes"], hello["process_id"]  # type: ignore[index]
                if not (type(n) is int and type(i) is int):
                    raise ValueError("bad handshake")
            except (ValueError, TypeError, KeyError, TimeoutError):
                conn.close()  # not one of ours
                continue
            if n != num_processes:
                problem = ValueError(
                    f"initialize: the processes were given different process counts: process {i} was given "
                    f"num_processes {n} and process 0 num_processes {num_processes}; give every process the same count"
                )
            elif i in joined:
                problem = ValueError(f"initialize: process id {i} was given to two processes; give each process its own id")
            elif not 1 <= i < num_processes:
                problem = ValueError(f"initialize: a process joined as process {i}, not in [1, {num_processes - 1}]")
            _send(conn, {"state": "waiting"} if problem is None else {"error": str(problem), "kind": "value"})
            if problem is None:
                joined[i] = conn
            else:
                conn.close()
    finally:
        answer = {"state": "go"} if problem is None else {
            "error": f"initialize: process 0 stopped the run: {str(problem).split(': ', 1)[-1]}",
            "kind": "value" if isinstance(problem, ValueError) else "runtime"}
        for conn in joined.values():
            _send(conn, answer)
            if problem is not None:
                conn.close()
    if problem is not None:
        raise problem
    return joined


def _closed(conn: socket.socket) -> bool:
    """Whether the other end of ``conn`` has closed it (nothing more is expected from it)."""
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        conn.setblocking(True)


def _drained(conn: socket.socket) -> bool:
    """Whether the other end of ``conn`` has closed it, reading (and dropping) what it sent before."""
    conn.setblocking(False)
    try:
        while conn.recv(4096):
            pass
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _ask_join(host: str, port: int, coordinator: str, num_processes: int, process_id: int, timeout: int) -> socket.socket:
    """A process > 0's side of the handshake: connect to process 0 (retrying for at most ``timeout``
    s), say which process of how many this is, and wait for the word to go on. RuntimeError (one
    line) if process 0 cannot be reached in time or something else answers on its port; ValueError
    if process 0 refuses the run (another process count, an id given twice). Returns the
    connection, kept open to watch process 0 (:func:`_watch`)."""
    deadline = time.monotonic() + timeout
    why = "nothing answered"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(
                f"initialize: could not reach process 0 at {coordinator} within {timeout} s ({why}); is process 0 "
                f"started, with this coordinator, and is its port reachable from this host?"
            )
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 10.0))
        except OSError as e:
            why = _one_line(e.strerror or e)
            time.sleep(min(0.25, max(left, 0)))
            continue
        with contextlib.ExitStack() as closing:
            closing.callback(conn.close)
            _send(conn, {"num_processes": num_processes, "process_id": process_id})
            not_ours = RuntimeError(
                f"initialize: the program at {coordinator} does not answer as a gradattn process 0 (is its port taken by "
                f"another program?); give a coordinator whose port process 0 serves"
            )
            pending = bytearray()
            try:
                answer = _receive(conn, min(deadline, time.monotonic() + _ANSWER_S), pending)
            except (ValueError, TimeoutError):
                raise not_ours from None
            if answer is None:  # process 0 went away, or took this for a stray connection: try again
                why = "the connection was closed"
                time.sleep(min(0.25, max(left, 0)))
                continue
            if "error" not in answer:
                if answer.get("state") != "waiting":
                    raise not_ours
                try:
                    answer = _receive(conn, deadline, pending)
                except TimeoutError:
                    raise RuntimeError(
                        f"initialize: not every process joined at {coordinator} within {timeout} s (process 0 waits for "
                        f"the others); are they all started, with the same coordinator?"
                    ) from None
                except ValueError:
                    raise not_ours from None
            if answer is None:
                raise RuntimeError(f"initialize: process 0 at {coordinator} stopped before every process joined (see its log)")
            if "error" in answer:
                raise (ValueError if answer.get("kind") == "value" else RuntimeError)(_one_line(answer["error"], 1000))
            if answer.get("state") != "go":
                raise not_ours
            closing.pop_all()
            return conn


def _detected_cluster() -> str | None:
    """The multi-process launcher this process runs under, as JAX would detect it, or None.

    A SLURM job step (``srun``) or an Open MPI job (``mpirun``) of more than one task; a one-task
    step is a plain process.
    """
    env = os.environ
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        if env["SLURM_NTASKS"].isdigit() and int(env["SLURM_NTASKS"]) > 1:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and env.get("OMPI_COMM_WORLD_SIZE", "1").isdigit():
        if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            return "ompi"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 60,
    shutdown_timeout: int = 120,
) -> bool:
    """Join a multi-process JAX run; call it before any other JAX work. Returns whether it joined one.

    * ``coordinator``, ``num_processes`` and ``process_id`` together: process ``process_id`` of
      ``num_processes``, with process 0 serving the coordinator at ``coordinator`` (``HOST:PORT``,
      an address of process 0's host that every process can reach). ``num_processes=1`` is a plain
      single process: nothing is initialised and False is returned.
    * none of them: under a SLURM job step of several tasks (``srun``) or an Open MPI job
      (``mpirun``) JAX detects the coordinator, the process count and this process's id itself;
      in a plain single process nothing happens and False is returned.
    * already initialised (``jax.distributed.initialize`` called before): True, after checking
      that any arguments given agree with the run.

    On CPU the cross-process collectives use gloo. JAX's preemption service
    (``multihost_utils.reached_preemption_sync_point``) is turned off: a stopped sweep resumes from
    its checkpoint directory instead. ``initialization_timeout``: seconds for all
    processes to connect before this raises; ``heartbeat_timeout``: seconds of silence after
    which a process is taken for dead and the others are stopped; ``shutdown_timeout``: seconds a
    finishing process waits at exit for the others to finish too.

    With an explicit ``coordinator`` every wait is bounded here, before JAX's runtime (whose
    failures to connect end the process from C++) is started: the host must resolve; process 0
    checks that it can serve the coordinator's port, then waits for every other process to connect
    to it and say which process of how many it is; the others connect to it (retrying while it is
    not up yet), and all of them go on, into ``jax.distributed.initialize``, only once all
    ``num_processes`` are there with the same count and distinct ids. The handshake's connections
    stay open to watch the other processes for the rest of the run (see the module docstring).

    Raises:
      ValueError/TypeError: a malformed ``coordinator`` (or a host that does not resolve), a
        ``process_id`` outside ``[0, num_processes)``, only some of the three arguments, a
        non-positive timeout; processes given different ``num_processes`` (the message names both
        counts) or the same ``process_id``: every process of the run raises, none starts.
      RuntimeError: the processes could not connect within ``initialization_timeout`` (process 0
        not reachable, some process missing), process 0 cannot serve the coordinator's port (in
        use), something else answers on that port, or JAX was already used in this process
        (initialise first).
      Every message is one line.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(
            f"initialize: give coordinator, num_processes and process_id together (or none of them, for a SLURM/MPI job "
            f"or a single process); missing {', '.join(missing)}"
        )
    timeouts = {"initialization_timeout": initialization_timeout, "heartbeat_timeout": heartbeat_timeout,
                "shutdown_timeout": shutdown_timeout}
    for name, val in timeouts.items():
        check_int(name, val, "initialize")
    if coordinator is not None:
        host, port = _split_coordinator(coordinator, "initialize")
        num_processes = check_int("num_processes", num_processes, "initialize")
        process_id = check_int("process_id", process_id, "initialize", minimum=0, maximum=num_processes - 1)
    if jax.distributed.is_initialized():
        if num_processes is not None and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(
                f"initialize: JAX is already initialised as process {jax.process_index()} of {jax.process_count()}, "
                f"not {process_id} of {num_processes}"
            )
        return True
    if coordinator is None:
        launcher = _detected_cluster()
        if launcher is None:
            return False
    elif num_processes == 1:
        return False
    if _backends_started():
        raise RuntimeError("initialize: JAX was already used in this process; call initialize before any other JAX work")
    if coordinator is not None:
        assert num_processes is not None and process_id is not None
        _resolve(host, port, min(initialization_timeout, 60))
        if process_id == 0:
            listener = _listen(port)
            try:
                peers = _serve_join(listener, num_processes, initialization_timeout)
            finally:
                listener.close()
        else:
            peers = {0: _ask_join(host, port, coordinator, num_processes, process_id, initialization_timeout)}
        _start_watch(process_id, peers)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with contextlib.suppress(AttributeError):  # an option of jax 0.10.2's; unused here (sweeps resume from chunks)
        jax.config.update("jax_enable_preemption_service", False)  # which would log lines of its own for a lost process
    where = f"at {coordinator} as process {process_id} of {num_processes}" if coordinator else f"under {launcher}"
    atexit.register(_at_exit)  # runs before JAX's own exit handler (registered at its import)
    with _busy():
        _Run.started += 1  # joining counts as the first gather: a process that leaves before it is lost
        try:
            jax.distributed.initialize(
                coordinator,
                num_processes,
                process_id,
                initialization_timeout=initialization_timeout,
                heartbeat_timeout_seconds=heartbeat_timeout,
                shutdown_timeout_seconds=shutdown_timeout,
            )
        except jax.errors.JaxRuntimeError as e:
            raise RuntimeError(
                f"initialize: could not join the JAX cluster {where} within {initialization_timeout} s "
                f"(are all processes started, with the same coordinator, and is its port reachable?): {_one_line(e)}"
            ) from e
        _Run.done += 1
    if coordinator is not None and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
        raise RuntimeError(
            f"initialize: JAX joined process {jax.process_index()} of {jax.process_count()}, not process {process_id} "
            f"of {num_processes} as given"
        )
    return True


def _backends_started() -> bool:
    """Whether JAX's backends are already up in this process (then it can no longer join a run)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - another jax layout: jax.distributed.initialize says so itself
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


def is_primary() -> bool:
    """True in process 0 of a multi-process run, and in a plain single process: the one that writes."""
    return jax.process_index() == 0


def _local_device_counts() -> list[int]:
    counts = [0] * jax.process_count()
    for d in jax.devices():
        counts[d.process_index] += 1
    return counts


@functools.lru_cache(maxsize=4)
def _gatherer(devices: tuple):
    """A jitted identity from a (P, ...) array with one row per process to its replicated copy."""
    mesh = Mesh(np.asarray(devices), ("processes",))
    rows = NamedSharding(mesh, PartitionSpec("processes"))
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec())), rows


def _allgather(tree, what: str):
    """Every process's ``tree`` stacked along a new axis 0 (process order), on every process.

    A global array over one device of each process, made replicated by a jitted identity: XLA's
    all-gather over JAX's collectives (gloo on CPU). Unlike ``multihost_utils.process_allgather``
    it allows processes with different numbers of local devices. A peer that is gone turns into a
    one line saying so and the end of this process (:data:`PEER_LOST_EXIT`).
    """
    first: dict[int, jax.Device] = {}
    for d in jax.devices():
        first.setdefault(d.process_index, d)
    devices = tuple(first[p] for p in range(jax.process_count()))
    identity, rows = _gatherer(devices)
    mine = first[jax.process_index()]

    def gather(x):
        x = np.asarray(x)[None]
        g = jax.make_array_from_single_device_arrays((len(devices), *x.shape[1:]), rows, [jax.device_put(x, mine)])
        try:
            return np.asarray(identity(g).addressable_data(0))
        except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:  # by jaxlib version and status code
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _lost_now(f"cluster_sweep: {what} across the {jax.process_count()} processes failed: another process of the run "
                      f"has most likely died or been stopped (see its log) [{_one_line(first, 160)}]")

    with _Run.lock:
        _Run.started += 1
        left = sorted(i for i, n in _Run.byes.items() if n < _Run.started)
    if left:  # said goodbye before this gather: it will never take part
        _lost_now(f"cluster_sweep: {what}: process(es) {left} left the run before the sweep ended (see their log)")
    out = jax.tree.map(gather, tree)
    _Run.done += 1
    return out


def _schedule(missing: np.ndarray, per_call: list[int]) -> list[list[tuple[int, np.ndarray]]]:
    """Rounds of calls: in each, process p takes the next ``per_call[p]`` missing positions."""
    rounds, i = [], 0
    while i < missing.size:
        row = []
        for p, size in enumerate(per_call):
            if i >= missing.size:
                break
            row.append((p, missing[i : i + size]))
            i += size
        rounds.append(row)
    return rounds


def sweep_manifest(fn, keys: jax.Array, chunk_size: int, fingerprint: dict | None, out_shape=None) -> dict:
    """What a checkpoint directory of this sweep records (see :mod:`gradattn.resume`).

    ``out_shape``: ``jax.eval_shape(fn, keys[0])`` if already known.
    """
    leaves, treedef = jax.tree.flatten(jax.eval_shape(fn, keys[0]) if out_shape is None else out_shape)

    return resume.canonical(
        {
            "format": resume.FORMAT,
            "fingerprint": fingerprint,
            "sweep": {
                "chunk_size": chunk_size,
                "prng_impl": str(jax.random.key_impl(keys)),
                "key_width": int(jax.random.key_data(keys).shape[-1]),
                "outputs": {"tree": str(treedef), "leaves": [[list(a.shape), str(a.dtype)] for a in leaves]},
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "backend": jax.default_backend(),
                "x64": bool(jax.config.jax_enable_x64),  # type: ignore[attr-defined]  # jax < 0.11 types no flag attributes
            },
        }
    )


def _check_checkpoint_dir(checkpoint_dir) -> str:
    """``checkpoint_dir`` as a path if it is an existing directory in which files can be created, or
    a path whose longest existing part is one (the sweep creates the rest; the command line's check,
    :func:`gradattn._io.check_directory`); SweepRefused (one line naming checkpoint_dir) otherwise,
    TypeError for a non-path."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"cluster_sweep: checkpoint_dir must be a path (str or os.PathLike), got {type(checkpoint_dir).__name__}")
    path = os.fspath(checkpoint_dir)
    if not isinstance(path, str):
        raise TypeError(f"cluster_sweep: checkpoint_dir must be a str path, got {path!r}")
    try:
        check_directory(path)
    except ValueError as e:
        raise resume.SweepRefused(f"cluster_sweep: checkpoint_dir {_one_line(e)}") from None
    return path


def cluster_sweep(
    fn: Callable[[jax.Array], Any],
    seeds: Sequence[int] | jax.Array,
    *,
    chunk_size: int | None = None,
    checkpoint_dir: str | None = None,
    fingerprint: dict | None = None,
    progress: bool = False,
):
    """:func:`gradattn.sweeps.sweep` over every process of a multi-process run, resumable from disk.

    ``out[i] = fn(seed_key(seeds[i]))``, bit-identical to ``sweep(fn, seeds, chunk_size=...)`` in
    one process (see the module docstring for how the work is split and gathered). Every process
    must call it with the same arguments; every process gets the whole result.

    Args:
      fn: a pure function of one PRNG key returning a pytree of arrays.
      seeds: as for :func:`gradattn.sweeps.sweep` (integers in ``[0, 2^64)``, or keys).
      chunk_size: seeds vmapped per device per call; default the backend's
        (:func:`gradattn.sweeps.default_chunk_size`, as for ``sweep``). A call holds
        ``chunk_size * n_local_devices`` seeds.
      checkpoint_dir: a directory (created if need be) in which every finished call is kept; a
        rerun computes only the seeds not yet there.
      fingerprint: with ``checkpoint_dir`` (required then), a JSON-able dict naming everything
        ``fn`` depends on (its config, task, the library version): a directory written with another
        fingerprint is refused. The chunk size, the PRNG implementation, the output shapes, the
        jax version and the backend are recorded and compared as well.
      progress: a tqdm bar (on process 0 only) of process 0's training steps, with the estimated
        time once measured and the seeds done across all processes (:mod:`gradattn._progress`).
    Returns:
      the pytree of ``fn``'s output with numpy leaves of shape ``(n_seeds, ...)``, on every process.
    Raises:
      gradattn.resume.SweepRefused (a ValueError): a checkpoint directory of another
        configuration, or one that cannot be one (a path under a regular file, a directory in
        which files cannot be created: checked first, before ``fn`` is traced); processes given
        different seeds, chunk sizes or fingerprints. Raised before anything is computed.
      ValueError, TypeError: bad arguments (a checkpoint_dir without a fingerprint, ...).
      Nothing for a lost process: another process of the run that dies, is stopped or leaves
        before the sweep ends ends this one too, at once, with one line on stderr and exit status
        :data:`PEER_LOST_EXIT` (see the module docstring), as JAX's runtime could not be shut down
        cleanly any more.
    """
    shown_dir = os.fspath(checkpoint_dir) if isinstance(checkpoint_dir, (str, os.PathLike)) else None
    with _busy(shown_dir):
        return _cluster_sweep(fn, seeds, chunk_size, checkpoint_dir, fingerprint, progress)


def _cluster_sweep(fn: Callable[[jax.Array], Any], seeds, chunk_size: int | None, checkpoint_dir, fingerprint: dict | None,
                   progress: bool):
    if not callable(fn):
        raise TypeError(f"cluster_sweep: fn must be a callable key -> pytree, got {fn!r}")
    keys = seed_keys(seeds)
    n = keys.shape[0]
    chunk_size = default_chunk_size() if chunk_size is None else check_int("chunk_size", chunk_size, "cluster_sweep")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise TypeError(f"cluster_sweep: fingerprint must be a JSON-able dict, got {type(fingerprint).__name__}")
    if checkpoint_dir is not None and fingerprint is None:
        raise ValueError(
            "cluster_sweep: a checkpoint_dir needs a fingerprint (a JSON-able dict of everything fn depends on: "
            "config, task, version), so that a directory of another configuration is never mixed in"
        )
    door: ValueError | None = None  # a checkpoint directory that cannot be used: refused before anything is traced or computed
    if checkpoint_dir is not None:
        try:
            _check_checkpoint_dir(checkpoint_dir)
        except resume.SweepRefused as e:
            if jax.process_count() == 1:
                raise
            door = e  # refused by every process together, below (alone, the others would wait for this one)
    out_shape = jax.eval_shape(fn, keys[0])  # one trace: the manifest, and buffers for every process
    manifest = sweep_manifest(fn, keys, chunk_size, fingerprint, out_shape)
    key_data = np.asarray(jax.random.key_data(keys))
    n_proc, me = jax.process_count(), jax.process_index()
    local = jax.local_devices()

    if n_proc > 1:  # the same sweep everywhere, or nothing (a mismatch would deadlock or mix results)
        h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode() + key_data.tobytes())
        mine = np.frombuffer(h.digest(), dtype=np.uint32).copy()
        every = _allgather(mine, "comparing the sweep's arguments")
        if not (every == every[0]).all():
            odd = [p for p in range(n_proc) if not (every[p] == every[0]).all()]
            raise resume.SweepRefused(
                f"cluster_sweep: the processes were given different sweeps (seeds, chunk size, fingerprint or library "
                f"versions): processes {odd} differ from process 0; give every process the same command"
            )

    leaf_specs, treedef = jax.tree.flatten(out_shape)
    buffers = [np.zeros((n, *a.shape), a.dtype) for a in leaf_specs]
    have = np.zeros(n, bool)
    store: resume.ChunkStore | None = None
    error: Exception | None = None
    if door is not None:
        error = door
    elif checkpoint_dir is not None:
        try:
            store = resume.open_store(checkpoint_dir, manifest)
            position: dict[bytes, list[int]] = {}
            for i, row in enumerate(key_data):
                position.setdefault(row.tobytes(), []).append(i)
            for chunk_keys, chunk_leaves in store.load():
                for r, row in enumerate(chunk_keys):
                    for i in position.get(row.tobytes(), ()):
                        have[i] = True
                        for buf, leaf in zip(buffers, chunk_leaves):
                            buf[i] = leaf[r]
        except (ValueError, OSError) as e:  # refused, or cannot be written: every process stops together
            error = e
    if n_proc > 1:
        flags = _allgather(np.concatenate([[error is not None], have]).astype(np.uint8), "comparing the checkpoints")
        failed = [p for p in range(n_proc) if flags[p, 0]]
        if error is not None:
            raise error
        if failed:
            raise resume.SweepRefused(f"cluster_sweep: process(es) {failed} refused their checkpoint directory (see their log); stopping")
        have_by = flags[:, 1:].astype(bool)
    else:
        if error is not None:
            raise error
        have_by = have[None]
    found = have_by.any(axis=0)
    owner = np.where(found, np.argmax(have_by, axis=0), -1)  # the first process holding a seed gives it
    missing = np.flatnonzero(~found)
    per_call = [chunk_size * c for c in _local_device_counts()]
    rounds = _schedule(missing, per_call)
    for row in rounds:
        for p, pos in row:
            owner[pos] = p

    done = 0
    with contextlib.ExitStack() as shown:
        bar = None
        if progress and me == 0:
            # training steps of this process's calls (the bar's total once the run is traced), and
            # the seeds done over every process in its text
            calls = sum(-(-pos.size // per_call[me]) for row in rounds for p, pos in row if p == me)
            bar = shown.enter_context(StepBar(ticked_step_count(fn, local), calls, f"{n} seeds over {n_proc} process(es)"))
            bar.note(f"seeds done {int(found.sum())}/{n}")
        for row in rounds:
            for p, pos in row:
                if p != me:
                    continue
                out = jax.tree.leaves(sweep(fn, keys[jnp.asarray(pos)], chunk_size=chunk_size, devices=local,
                                            ticks=progress))
                for buf, leaf in zip(buffers, out):
                    buf[pos] = leaf
                if store is not None:
                    store.write(key_data[pos], out)
                done += pos.size
            # one tiny collective per round: the bar's count across processes, and a heartbeat that
            # stops every process at the first round after one of them has gone
            total = int(_allgather(np.asarray([done], np.int64), "reporting progress").sum()) if n_proc > 1 else done
            if bar is not None:
                bar.note(f"seeds done {int(found.sum()) + total}/{n}")

    if n_proc > 1:
        owned = [np.flatnonzero(owner == p) for p in range(n_proc)]
        width = max(o.size for o in owned)
        pack = [np.zeros((width, *b.shape[1:]), b.dtype) for b in buffers]
        for dst, buf in zip(pack, buffers):
            dst[: owned[me].size] = buf[owned[me]]
        every = _allgather(pack, "gathering the results")
        for p in range(n_proc):
            if p != me:
                for buf, got in zip(buffers, every):
                    buf[owned[p]] = got[p, : owned[p].size]
    return jax.tree.unflatten(treedef, buffers)
