"""The ``gradattn`` command.

    gradattn em-vs-sgd --seeds N --out results.json [--plot curves.png] [--seed-list 3,7,11]
                       [every field of EmVsSgdConfig and of the task as a flag: --steps, --sgd-lr,
                        --value-lr, --routing-lr, --d-k, --d-v, --init-scale, --grad-source,
                        --seq-len, --self-prob, --noise-std, --embeddings, ...]
                       [--chunk-size K] [--no-progress] [--checkpoint-dir DIR] [--no-compilation-cache]
                       [--coordinator HOST:PORT --num-processes P --process-id I]
    gradattn deep --seeds N --out deep.json [--plot deep.png] [--fresh-data] [--two-timescale]
                  [every field of DeepConfig and of the task as a flag]
                  [--chunk-size K] [--no-progress] [--checkpoint-dir DIR] [cluster flags as above]
    gradattn plateau --seeds N --out plateau.json [every field of PlateauConfig and of the task]
    gradattn manifold --seeds N --out manifold.json [every field of ManifoldConfig and of the task]
    gradattn bijection --seeds N --out bijection.json [--plot gap.png] [every field of BijectionConfig and of the task]
    gradattn laws-check [--n N] [--seed S]
    gradattn rerun RESULT.json [--out NEW.json] [--plot P] [--no-progress]
    gradattn --version

``--out`` is optional: the summary is printed either way. ``--per-seed-curves`` keeps every seed's
training curves in the JSON. ``rerun`` runs the experiment a result JSON describes again (its
config, seeds and chunk size), prints the summary and says whether every per-seed number equals the
file's (they do, bit for bit, on the same jax version and machine type).

The flags of an experiment are made from its config's fields and the task's (each field declares
its help and bounds once, with :func:`gradattn._config.option`; the library enforces the same).
Every argument is checked (sizes against upper bounds too, and that the output files can be
written) before any work starts; bad input gives a one-line error on stderr and exit status 2.
Options are spelled out (no prefixes) and given once each; one that another option's value leaves
without effect (:data:`_IDLE`) is refused when given, whatever its value. Output paths are checked
as the operating system resolves them (``..`` and symlinks on disk) and written by the path that
was checked; ``--out`` and ``--plot`` may not name one file, nor lie inside ``--checkpoint-dir``.
The summary is printed before the files are written; results are written whole or not at all (a
temp file in the same directory, then ``os.replace``), and a failed write is one line naming the
path and the reason, with exit status 1. Ctrl-C stops the command with one line and exit status 130
in any phase (see :mod:`gradattn_launcher`, the console script's entry).

An experiment runs over every process of a multi-process JAX run (docs/cluster.md): the three
cluster flags name the coordinator, the process count and this process's id (or, without them,
JAX detects a SLURM or Open MPI job itself); the processes join before any JAX work, every one
computes its share of the seeds, and only process 0 checks and writes ``--out`` and ``--plot``
and prints the summary (the others exit 0 after the sweep). ``--checkpoint-dir`` keeps every
finished chunk, so that the same command run again computes only the missing seeds; a directory
of another configuration is refused with one line and exit status 2.

Compiled programs are kept in JAX's persistent compilation cache (``~/.cache/gradattn/jax``, or
``$XDG_CACHE_HOME/gradattn/jax``, or ``$GRADATTN_CACHE_DIR``), so that a second run of the same
sizes skips compilation; ``--no-compilation-cache`` (or ``GRADATTN_NO_COMPILATION_CACHE=1``) turns
it off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from typing import NamedTuple, NoReturn

import jax
import numpy as np

from gradattn import _compile_cache, cluster, experiments, memory, resume, tasks
from gradattn._checks import MAX_SEED, check_int
from gradattn._config import check_field, field_kind, flat_fields, flat_get, nest
from gradattn._io import check_directory, check_output_path, directory_place, same_file, write_json
from gradattn._parse import parse_float, parse_int
from gradattn._version import __version__
from gradattn.sweeps import seed_key
from gradattn.verify import laws_check_errors

MAX_SEEDS = 1_000_000
"""Most seeds one command runs (a million runs of the paper's size is days of CPU time)."""
MAX_RESULT_BYTES = 4 << 30
"""Most bytes of loss curves (seeds x steps x 2 arms x float32) one run may hold."""
MAX_LAWS_CHECK_N = 4096
"""laws-check builds float64 N x N matrices: 4096^2 x 8 bytes = 134 MB each."""
MAX_PROCESSES = 65_536
"""Most processes one multi-process run may have (``--num-processes``)."""


def _int_arg(text: str) -> int:
    """The text of every integer flag as an int (the one integer parser: ASCII digits only; ValueError if it is none)."""
    return parse_int(text)


def _float_arg(text: str) -> float:
    """The text of every number flag as a float (the one number parser: ASCII, finite in float32; ValueError if it is none)."""
    return parse_float(text, float32=True)


def _checked(check, convert, what: str):
    """An argparse type: ``convert`` the text, then one of the library's checkers (one error policy)."""

    def parse(text: str):
        try:
            val = convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}; must be {what}") from None
        try:
            return check(val)
        except (TypeError, ValueError) as err:
            # argparse names the flag; drop the library's own name for the value ("d_k must be ...")
            raise argparse.ArgumentTypeError(re.sub(r"^\w+ (?=must )", "", str(err).split(": ", 1)[-1])) from None

    return parse


def _int_in(minimum: int, maximum: int | None = None):
    rng = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    return _checked(lambda v: check_int("value", v, "cli", minimum=minimum, maximum=maximum), _int_arg, f"an integer {rng}")


def _field_type(cls, name: str):
    """The argparse type of config field ``name``: its text parsed by :func:`_int_arg` or
    :func:`_float_arg`, then checked against the bounds declared with the field."""
    kind, _ = field_kind(cls, name)
    check = lambda v: check_field(cls, name, v, "cli")  # noqa: E731
    if kind is int:
        return _checked(check, _int_arg, "an integer")
    if kind is float:
        return _checked(check, _float_arg, "a number")
    return str


def _seed(text: str) -> int:
    return _int_in(0, MAX_SEED)(text)


def _seed_list(text: str) -> list[int]:
    if any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be comma-separated seeds with no spaces, like 3,7,11, got {text!r}")
    seeds = []
    for part in text.split(","):
        try:
            s = _int_arg(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated non-negative integers in ASCII digits, like 3,7,11, got {text!r}") from None
        if not 0 <= s <= MAX_SEED:
            raise argparse.ArgumentTypeError(f"seeds must be integers in [0, 2^64 - 1], got {s} in {text!r}")
        seeds.append(s)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    if len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SEEDS} seeds, got {len(seeds)}")
    return seeds


def _embeddings(text: str):
    try:
        return tasks.embeddings_from_spec(text)
    except (TypeError, ValueError, OSError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _coordinator(text: str) -> str:
    try:
        return cluster.check_coordinator(text, "cli")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None


def _checkpoint_dir(text: str) -> str:
    """``--checkpoint-dir`` (and ``--save-dir``): an existing directory in which files can be created, or a path whose
    longest existing part is one (the sweep creates the rest): :func:`gradattn._io.check_directory`."""
    try:
        check_directory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


class _Target(NamedTuple):
    """An output file: the path the write uses (checked, every symlink and ``..`` resolved) and the
    path as given, which messages show."""

    path: str
    given: str


def _output_path(parser: argparse.ArgumentParser, option: str, path: str) -> _Target:
    """The regular file ``path`` names (a symlink followed), or exit 2 if it cannot be one."""
    try:
        return _Target(check_output_path(path), path)
    except ValueError as err:
        parser.error(f"{option} {err}")


def _within(path: str, directory: str) -> bool:
    """Whether resolved ``path`` is ``directory`` or lies below it (as text, both resolved)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _in_directory(target: str, directory: str) -> bool:
    """Whether the resolved file ``target`` is in resolved ``directory`` or below it: by path, and,
    where the directory exists, by device and inode of each directory above ``target`` (so that a
    second mount of it is found too)."""
    if _within(target, directory):
        return True
    try:
        st = os.stat(directory)
    except OSError:
        return False
    above = os.path.dirname(target)
    while True:
        try:
            if os.path.samestat(os.stat(above), st):
                return True
        except OSError:
            return False
        parent = os.path.dirname(above)
        if parent == above:
            return False
        above = parent


_GIVEN = "_options_given"
"""The attribute of a parsed namespace holding the destinations of the options given so far."""


def _once(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """``action_class`` refusing its option given a second time (argparse would keep the last one
    silently): ``--seeds 3 --seeds 4`` is an error naming ``--seeds``, switches included."""

    class Once(action_class):  # type: ignore[valid-type,misc]  # a class made at run time
        def __call__(self, parser, namespace, values, option_string=None):
            if self.option_strings:
                given = namespace.__dict__.setdefault(_GIVEN, set())
                if self.dest in given:
                    raise argparse.ArgumentError(self, "given more than once; give each option once")
                given.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    Once.__name__ = Once.__qualname__ = f"Once{action_class.__name__}"
    return Once


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), without the usage;
    options are matched only when spelled out (no prefixes: ``--step`` is not ``--steps``) and
    each may be given once. Its subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        for name in (None, "store", "store_const", "store_true", "store_false"):  # None: argparse's default, store
            self.register("action", name, _once(self._registry_get("action", name)))

    def error(self, message) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _default_text(val) -> str:
    return "" if val is None or isinstance(val, np.ndarray) else f" (default {val})"


def _add_fields(p, cls, defaults, prefix: str = "") -> None:
    """A flag for every option of dataclass ``cls`` (those of its nested specs included, by their
    flat names: :func:`gradattn._config.flat_fields`): ``--option-name`` (its help and bounds from
    the field), a store-true flag for a bool, and the field's own ``flag`` setting it to ``const``
    for a switch."""
    for flat in flat_fields(cls):
        meta, owner, name = flat.field.metadata, flat.owner, flat.field.name
        help_text = prefix + flat.help_prefix + meta["help"]
        if "flag" in meta:
            p.add_argument(meta["flag"], dest=flat.name, action="store_const", const=meta["const"], default=None,
                           help=help_text)
        elif field_kind(owner, name)[0] is bool:
            p.add_argument(_flag(flat.name), dest=flat.name, action="store_const", const=True, default=None,
                           help=help_text)
        else:
            text = help_text + (f": one of {', '.join(meta['choices'])}" if "choices" in meta else "")
            p.add_argument(_flag(flat.name), dest=flat.name, type=_field_type(owner, name), default=None,
                           help=text + _default_text(flat_get(defaults, flat)))


def _given(args, cls, base=None) -> dict:
    """The options of ``cls`` whose flags were given, as keyword arguments of ``cls`` (nested specs
    built from their defaults, or ``base``'s, and the options given: :func:`gradattn._config.nest`)."""
    return nest(cls, base=base, values={flat.name: getattr(args, flat.name) for flat in flat_fields(cls)
                      if getattr(args, flat.name, None) is not None})


class _Idle(NamedTuple):
    """An option that another option's value makes idle: given explicitly (whatever its value, the
    default included) while ``active`` is false of the other option's value, it is refused with one
    line naming both, rather than ignored."""

    option: str
    """The idle option's destination (its config field)."""
    other: str
    """The destination of the option whose value decides."""
    active: Callable[[object], bool]
    """Whether ``option`` has an effect, of ``other``'s value (as given, else the config's default)."""
    when: str
    """When it has none, in flags."""
    why: str
    """What it would have set."""
    needs: str
    """When it has one, in flags."""


def _drawn_means(spec) -> bool:
    return spec is None or "embed_seed" in spec


_IDLE: dict[type, tuple[_Idle, ...]] = {
    experiments.deep.DeepConfig: (
        _Idle("value_lr_multiplier", "schedule", lambda v: v == "two_timescale", "without --two-timescale",
              "it is the value projections' rate ratio under --two-timescale", "with --two-timescale"),
        *(_Idle(name, "n_checkpoints", lambda v: v != 0, "with --n-checkpoints 0",
                "settling is measured over the checkpoints", "with checkpoints (--n-checkpoints above 0, or left out)")
          for name in ("settle_tol", "settle_rows")),
    ),
    experiments.bijection.BijectionConfig: (
        _Idle("head_value_lr", "head_optimizer", lambda v: v == "em_like", "unless --head-optimizer is em_like",
              "it is W_V's rate under em_like", "with --head-optimizer em_like"),
    ),
    tasks.StickyMarkov: tuple(
        _Idle(name, "embeddings", _drawn_means, "with --embeddings reference or a .npy file",
              "the means give the sizes", "with drawn means (--embeddings seed:N, --embed-seed, or neither)")
        for name in ("n_symbols", "d_embed")
    ),
}
"""Per config or task class, its options that another option's value makes idle."""


def _check_idle(args, parser, classes_and_defaults) -> None:
    """Exit 2 (one line naming both flags) if an option of :data:`_IDLE` was given where another
    option's value leaves it without effect."""
    for cls, defaults in classes_and_defaults:
        flags = {f.name: f.field.metadata.get("flag", _flag(f.name)) for f in flat_fields(cls)}
        for rule in _IDLE.get(cls, ()):
            if getattr(args, rule.option, None) is None:
                continue
            value = getattr(args, rule.other, None)
            if value is None and rule.other in flags:  # a field left out: the config's default
                value = getattr(defaults, rule.other)
            if not rule.active(value):
                flag = flags[rule.option]
                parser.error(f"argument {flag}: has no effect {rule.when} ({rule.why}); give it only {rule.needs}")


def _as_flags(message: str, classes) -> str:
    """An error of a config or task class in the words of the command line: the leading
    ``ClassName: `` dropped, and every ``field=value`` of the classes' flag fields written as the
    flag the user typed (``checkpoint_every=40`` -> ``--checkpoint-every 40``)."""
    flats = [f for cls in classes for f in flat_fields(cls)]
    names = {f.field.name if f.owner not in classes else f.name: f.field.metadata.get("flag", _flag(f.name))
             for f in flats}
    head, sep, rest = message.partition(": ")
    if sep and head in {cls.__name__ for cls in classes} | {f.owner.__name__ for f in flats}:
        message = rest
    for name, flag in sorted(names.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w-]){name}=", f"{flag} ", message)
        message = re.sub(rf"^{name}(?= must| needs| exceeds)", flag, message)
    return message


def _build(parser, make, classes=(), **kw):
    try:
        return make(**kw)
    except (TypeError, ValueError) as err:
        parser.error(_as_flags(str(err), classes or (make,)))


def _build_task(args, parser, defaults):
    """The command's task: built from the task flags given, on top of the fields in which the
    default config's task (``defaults``, the config type's or a preset's) differs from its class's
    defaults (e.g. a study's T = 500)."""
    default = defaults.task
    cls = type(default)
    plain = cls()
    task_kw = {f.name: getattr(default, f.name) for f in flat_fields(cls)
               if getattr(default, f.name) != getattr(plain, f.name)}
    task_kw.update(_given(args, cls))
    if getattr(args, "embeddings", None) is not None:
        if "embed_seed" in task_kw:
            parser.error("give either --embeddings or --embed-seed, not both (--embeddings seed:N is --embed-seed N)")
        task_kw.update(args.embeddings)
    return _build(parser, cls, (cls,), **task_kw)


def _outputs(args, parser) -> tuple[_Target | None, _Target | None]:
    """The checked ``--out`` and ``--plot`` targets, each None when not given (exit 2 before any
    work if one cannot be written, if both name one file, or if one is inside ``--checkpoint-dir``,
    whose files the sweep writes and removes)."""
    out = None if args.out is None else _output_path(parser, "--out", args.out)
    plot = None
    if getattr(args, "plot", None) is not None:
        plot = _output_path(parser, "--plot", args.plot)
        if out is not None and same_file(out.path, plot.path):
            parser.error(f"--out {args.out!r} and --plot {args.plot!r} name the same file ({plot.path})")
        suffix = os.path.splitext(plot.path)[1].lstrip(".").lower()
        from matplotlib.figure import Figure  # only when a figure is asked for: --help stays quick

        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            parser.error(f"argument --plot {args.plot!r}: unsupported figure format {suffix!r}; use one of {', '.join(sorted(formats))}")
    if getattr(args, "checkpoint_dir", None) is not None:
        try:
            place = directory_place(args.checkpoint_dir)
        except ValueError as err:  # changed on disk since the flag was read
            parser.error(f"argument --checkpoint-dir: {err}")
        for option, target in (("--out", out), ("--plot", plot)):
            if target is None:
                continue
            if _in_directory(target.path, place):
                where = "is" if target.path == place else "is inside"
                parser.error(f"argument {option}: {target.given!r} {where} --checkpoint-dir {args.checkpoint_dir!r}, whose "
                             "files the sweep writes and removes; write the results outside it")
            if _within(place, target.path):
                parser.error(f"argument {option}: --checkpoint-dir {args.checkpoint_dir!r} would be created inside "
                             f"{target.given!r}, the file of the results; give them two separate paths")
    return out, plot


def _check_result_size(parser, n_seeds: int, steps: int, curves: int) -> None:
    result_bytes = n_seeds * steps * curves * 4
    if result_bytes > MAX_RESULT_BYTES:
        parser.error(
            f"{n_seeds} seeds x {steps} steps would hold {result_bytes / 2**30:.1f} GiB of loss curves "
            f"(limit {MAX_RESULT_BYTES / 2**30:.0f} GiB); run fewer seeds per command"
        )


def _report(results: dict, text: str, out: _Target | None, plot: _Target | None, plot_fn) -> int:
    """Print the summary, then write the JSON and the figure (those given) to the paths their
    checks resolved; a failed write is one line and exit 1. Messages name the paths as given."""
    print(text)
    writes: list[tuple[str, Callable[[], object]]] = []
    if out is not None:
        writes.append((out.given, lambda: write_json(results, out.path)))
    if plot is not None:
        writes.append((plot.given, lambda: plot_fn(results, plot.path)))
    for given, write in writes:
        try:
            write()
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            print(f"gradattn: error: could not write {given!r}: {reason}; nothing was written there", file=sys.stderr)
            return 1
    written = [t.given for t in (out, plot) if t is not None]
    if written:
        print("wrote " + " and ".join(written))
    return 0


def _seeds(args) -> list[int]:
    return args.seed_list if args.seed_list is not None else list(range(args.seeds))


def _cluster_flags(args, parser) -> tuple | None:
    """``(coordinator, num_processes, process_id)`` when the cluster flags are given (all three, or
    exit 2), None when none is."""
    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes, "--process-id": args.process_id}
    if all(v is None for v in flags.values()):
        return None
    missing = [k for k, v in flags.items() if v is None]
    if missing:
        parser.error(f"give --coordinator, --num-processes and --process-id together (or none of them: a single process, "
                     f"or a SLURM or Open MPI job that JAX detects); missing {', '.join(missing)}")
    if args.process_id >= args.num_processes:
        parser.error(f"argument --process-id: must be in [0, {args.num_processes - 1}] for --num-processes "
                     f"{args.num_processes}, got {args.process_id}")
    return args.coordinator, args.num_processes, args.process_id


def _join(parser, flags: tuple | None) -> int | None:
    """:func:`gradattn.cluster.initialize` with the cluster flags (before any JAX work); a failure
    to connect is one line and exit status 1 (returned), None when this process may go on."""
    try:
        cluster.initialize(*(flags or ()))
    except RuntimeError as err:
        print(f"gradattn: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    return None


CACHE_DIR_VAR = "GRADATTN_CACHE_DIR"
"""Environment variable naming the directory of the persistent compilation cache."""
NO_CACHE_VAR = "GRADATTN_NO_COMPILATION_CACHE"
"""Environment variable that, set to a non-empty value, turns the compilation cache off (as the flag)."""


def default_cache_dir() -> str:
    """``$GRADATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradattn/jax``, else ``~/.cache/gradattn/jax``."""
    if os.environ.get(CACHE_DIR_VAR):
        return os.environ[CACHE_DIR_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradattn", "jax")


def _use_compilation_cache(args) -> None:
    """JAX's persistent compilation cache in :func:`default_cache_dir`, unless turned off: a second
    run of the same command and sizes loads its compiled programs instead of compiling them again
    (the results are the same programs, so the same numbers). A directory that cannot be created
    leaves the cache off; nothing else changes. Entries that a full disk or a killed run left partial
    are removed first, and the cache's errors are at most one line per run
    (:func:`gradattn._compile_cache.enable`)."""
    if args.no_compilation_cache or os.environ.get(NO_CACHE_VAR):
        return
    _compile_cache.enable(default_cache_dir())


def _experiment(args, parser) -> int:
    """Any experiment command: its config from the flags, the run, the report (by process 0 only)."""
    command = args.experiment
    defaults = command.presets[args.preset]() if getattr(args, "preset", None) else command.config_type()
    _check_idle(args, parser, ((command.config_type, defaults), (type(defaults.task), defaults.task)))
    _use_compilation_cache(args)
    seeds = _seeds(args)
    flags = _cluster_flags(args, parser)
    if flags is None:  # a single process, or a SLURM/MPI job: who is process 0 is known once joined
        if (status := _join(parser, None)) is not None:
            return status
        primary = cluster.is_primary()
    else:
        primary = flags[2] == 0
    out, plot = _outputs(args, parser) if primary else (None, None)
    cls = command.config_type
    # From a preset, every field of it; without one, the config's own defaults (some are computed
    # from the fields given, such as the deep run's checkpoints).
    kw = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)
          if f.init and f.name != "task" and getattr(args, "preset", None)}
    kw.update(_given(args, cls, base=defaults))
    task = _build_task(args, parser, defaults)
    config = _build(parser, cls, (cls, type(task)), task=task, **kw)
    return _run_command(args, parser, command, config, seeds, flags, primary, out, plot)


def _run_command(args, parser, command, config, seeds, flags, primary, out, plot,
                 reference: tuple[str, dict] | None = None) -> int:
    """The sweep of ``command`` with ``config`` over ``seeds``, then the report (by process 0 only);
    with ``reference`` (``(path, results)`` of an earlier run), whether the per-seed numbers equal it."""
    _check_result_size(parser, len(seeds), config.steps, curves=command.curves)
    try:  # what can be checked before any JAX backend starts, so before a multi-process run joins
        memory.check_memory_before_start(command.name, config, args.chunk_size, n_seeds=len(seeds))
    except memory.MemoryEstimateError as err:
        parser.error(_memory_refusal(err, command, config))
    if flags is not None and (status := _join(parser, flags)) is not None:  # every check passed: connect
        return status
    try:
        results = experiments.run_experiment(command, seeds, config, chunk_size=args.chunk_size,
                                             progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                                             per_seed_curves=args.per_seed_curves,
                                             save_dir=getattr(args, "save_dir", None))
    except resume.SweepRefused as err:  # found at start-up, before any seed was computed
        parser.error(str(err))
    except memory.MemoryEstimateError as err:  # against this process's devices, before compiling
        parser.error(_memory_refusal(err, command, config))
    except resume.CheckpointWriteError as err:  # the disk filled up or turned read-only mid-sweep
        unwritten = " and ".join(repr(p) for p in (out, plot) if p is not None)
        note = f"; {unwritten} not written (the run is incomplete)" if unwritten else ""
        print(f"gradattn: error: {err}{note}", file=sys.stderr)
        return 1
    if not primary:
        print(f"process {jax.process_index()} of {results['n_processes']}: sweep done; process 0 writes the results")
        return 0
    status = _report(results, command.format(results), out, plot, command.plot)
    if reference is not None:
        print(_compare_per_seed(*reference, results))
    return status


def _memory_refusal(err: Exception, command, config) -> str:
    """A memory refusal (:mod:`gradattn.memory`) in the words of the command line: without the
    library function's name, every size as the flag that sets it."""
    text = str(err).split(": ", 1)[-1].replace("chunk_size=", "--chunk-size ").replace("chunk_size", "--chunk-size")
    return _as_flags(text, (command.config_type, type(config.task)))


def _per_seed_arrays(results: dict) -> dict[str, np.ndarray]:
    """Every per-seed number of a result dict (``per_seed`` and ``per_seed_curves``), as float arrays (null: NaN)."""
    out = {}
    for section in ("per_seed", "per_seed_curves"):
        for name, v in (results.get(section) or {}).items():
            try:
                out[f"{section}.{name}"] = np.asarray(v, np.float64)
            except (TypeError, ValueError):  # ragged or non-numeric: compared as given
                out[f"{section}.{name}"] = np.asarray(json.dumps(v))
    return out


def _compare_per_seed(path: str, old: dict, new: dict) -> str:
    """One line: whether every per-seed number of ``new`` equals ``old``'s (read from ``path``)."""
    a, b = _per_seed_arrays(old), _per_seed_arrays(new)
    if a.keys() != b.keys():
        return f"per-seed results: the fields differ from {path} ({', '.join(sorted(a.keys() ^ b.keys()))})"
    differ = {}
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape:
            differ[name] = float("inf")
        elif x.dtype.kind == "f" and not np.array_equal(x, y, equal_nan=True):
            differ[name] = float(np.nanmax(np.abs(x - y)))
        elif x.dtype.kind != "f" and not np.array_equal(x, y):
            differ[name] = float("inf")
    if not differ:
        return f"per-seed results: identical to {path} ({len(a)} fields, bit for bit)"
    name = max(differ, key=lambda k: differ[k])
    return (f"per-seed results: {len(differ)} of {len(a)} fields differ from {path}; the largest difference is "
            f"{differ[name]:.3g} in {name} (another jax version or machine type changes the last float32 bits)")


def _rerun(args, parser: _Parser) -> int:
    """``gradattn rerun RESULT.json``: the experiment the file describes, again."""
    try:
        with open(args.result, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        parser.error(f"argument RESULT: cannot read {args.result!r}: {reason}")
    name = old.get("experiment") if isinstance(old, dict) else None
    command = next((c for c in _commands() if c.tag == name), None)
    if command is None:
        parser.error(f"argument RESULT: {args.result!r} is not a gradattn result (its experiment is {name!r}; "
                     f"known: {', '.join(c.tag for c in _commands())})")
    try:
        config = experiments.config_from_dict(command.config_type, old.get("config"))
        seeds = [int(s) for s in old["seeds"]]
        args.chunk_size = None if old.get("chunk_size") is None else int(old["chunk_size"])
    except (KeyError, TypeError, ValueError) as err:
        parser.error(f"argument RESULT: cannot rebuild the {command.command} run from {args.result!r}: {err}")
    if args.plot is not None and command.plot is None:
        parser.error(f"argument --plot: {args.result!r} is a result of gradattn {command.command}, which has no figure; drop --plot")
    args.per_seed_curves = "per_seed_curves" in old
    args.checkpoint_dir = None
    args.save_dir = None
    _use_compilation_cache(args)
    if (status := _join(parser, None)) is not None:
        return status
    out, plot = _outputs(args, parser)
    print(f"rerun of {args.result}: gradattn {command.command}, {len(seeds)} seed(s), chunk size {args.chunk_size} "
          f"(written by gradattn {(old.get('provenance') or {}).get('versions', {}).get('gradattn', '?')})")
    return _run_command(args, parser, command, config, seeds, None, True, out, plot, reference=(args.result, old))


def _windtunnel_probe(args, parser) -> int:
    """``gradattn windtunnel-probe MODELS``: :func:`gradattn.experiments.windtunnel_probe.probe_saved`."""
    if not os.path.isfile(os.path.join(args.models, "config.json")):
        parser.error(f"argument MODELS: {args.models!r} holds no saved wind-tunnel run (no config.json); write one with "
                     "windtunnel-bijection or windtunnel-hmm --save-dir")
    if args.ablation_sequences > args.sequences:
        parser.error(f"argument --ablation-sequences: {args.ablation_sequences} exceeds --sequences {args.sequences}")
    out, plot = _outputs(args, parser)
    study = experiments.windtunnel_probe  # loads flax and the models on first use
    try:
        results = study.probe_saved(args.models, sequences=args.sequences, ablation_sequences=args.ablation_sequences,
                              probe_seed=args.probe_seed,
                              progress=lambda i, n: print(f"probed seed {i}/{n}", file=sys.stderr, flush=True))
    except ValueError as err:
        parser.error(f"argument MODELS: {err}")
    return _report(results, study.format_probe(results), out, plot, study.plot_probe)


def _laws_check(args, parser) -> int:
    errors = laws_check_errors(seed_key(args.seed), n=args.n)
    width = max(len(k) for k in errors)
    print(f"worst relative error of each law vs autodiff (float64, N = {args.n}, seed {args.seed}):")
    for name, err in errors.items():
        print(f"  {name:<{width}}  {err:.2e}")
    worst = max(errors.values())
    ok = worst < 1e-9
    print(f"{'OK' if ok else 'FAIL'}: worst {worst:.2e} (tolerance 1e-9)")
    return 0 if ok else 1


def _common(p, plot: bool) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--seeds", type=_int_in(1, MAX_SEEDS), default=5, help="run seeds 0..N-1 (default 5)")
    group.add_argument("--seed-list", type=_seed_list, default=None, help="explicit seeds in [0, 2^64), e.g. 3,7,11")
    p.add_argument("--out", default=None, help="results JSON path (optional: the summary is printed either way)")
    p.add_argument("--per-seed-curves", action="store_true",
                   help="keep every seed's training curves in the JSON (default: their mean and sd over seeds only)")
    if plot:
        p.add_argument("--plot", default=None, help="optional figure path (png, pdf, svg)")
    p.add_argument("--checkpoint-dir", type=_checkpoint_dir, default=None,
                   help="keep every finished chunk of seeds in this directory (created if need be); the same command "
                        "with the same directory resumes a stopped sweep, computing only the missing seeds")
    group = p.add_argument_group("several processes or hosts (docs/cluster.md); give all three, or none")
    group.add_argument("--coordinator", type=_coordinator, default=None,
                       help="HOST:PORT of process 0 (it serves the coordinator there); every process gives the same")
    group.add_argument("--num-processes", type=_int_in(1, MAX_PROCESSES), default=None, help="number of processes")
    group.add_argument("--process-id", type=_int_in(0, MAX_PROCESSES - 1), default=None,
                       help="this process's id, 0 .. P-1 (process 0 writes --out and --plot)")


def _commands() -> tuple[experiments.Experiment, ...]:
    """The experiments of :func:`gradattn.experiments.registry` that have a command, in its order."""
    return tuple(e for e in experiments.registry() if e.command is not None)


H_MIN_HELP = ("Losses are in nats. H_min, printed with the results, is the loss of an oracle that knows the previous "
              "symbol: the mean entropy of the rows of the chain's transition matrix (1.8292 nats at the defaults); "
              "the exact Bayes loss of a sequence, which sees only the noisy inputs, lies a little above it. "
              "'mean ± sd' is over seeds, the sample standard deviation.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradattn", description="Gradient dynamics of one attention head.")
    parser.add_argument("--version", action="version", version=f"gradattn {__version__} (jax {jax.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _commands():
        task_type = type(command.config_type().task)
        p = sub.add_parser(command.command or command.name, help=command.help, description=command.help[0].upper() + command.help[1:] + ".",
                           epilog=H_MIN_HELP if task_type is tasks.StickyMarkov else None)
        _common(p, plot=command.plot is not None)
        if command.save is not None:
            p.add_argument("--save-dir", type=_checkpoint_dir, default=None,
                           help="write every seed's trained parameters (and the kept checkpoints) here with orbax, "
                                "beside config.json, to load and probe the models later")
        if command.presets:
            p.add_argument("--preset", choices=tuple(command.presets), default=None,
                           help="start from a named configuration (its flags given here override it): "
                                + ", ".join(command.presets) + " (default: the defaults below)")
        _add_fields(p, command.config_type, command.config_type())
        task = command.config_type().task
        _add_fields(p, type(task), task, prefix="task: ")
        if isinstance(task, tasks.StickyMarkov):
            p.add_argument("--embeddings", type=_embeddings, default=None,
                           help="task: symbol means: 'reference' (the reference code's; the default at 8 x 20), 'seed:N', "
                                "or a (C, d) .npy file")
        p.add_argument("--chunk-size", type=_int_in(1, 65_536), default=None,
                       help="seeds vmapped per device per call (default: 1 on CPU, 256 on GPU/TPU; results are "
                            "reproducible per chunk size)")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bar; the run's compiled program can then come from the compilation cache "
                            "(JAX does not cache programs that report progress to the host)")
        p.add_argument("--no-compilation-cache", action="store_true",
                       help=f"do not keep compiled programs in {CACHE_DIR_VAR} (default: {default_cache_dir()}) for the "
                            "next run of the same sizes")
        p.set_defaults(run=_experiment, sub=p, experiment=command)

    p = sub.add_parser("laws-check", help="each first-order law vs autodiff, float64, on a random instance")
    p.add_argument("--n", type=_int_in(1, MAX_LAWS_CHECK_N), default=37, help="sequence length N (default 37)")
    p.add_argument("--seed", type=_seed, default=0, help="PRNG seed in [0, 2^64) (default 0)")
    p.set_defaults(run=_laws_check, sub=p)

    p = sub.add_parser("windtunnel-probe", help="the geometry of the GPT models a wind-tunnel run saved (--save-dir), "
                       "beside their untrained models and controls")
    p.add_argument("models", metavar="MODELS", help="a directory written by windtunnel-bijection or windtunnel-hmm --save-dir")
    p.add_argument("--sequences", type=_int_in(2, 100_000), default=512,
                   help="fresh sequences of the models' task every statistic is measured on (default 512)")
    p.add_argument("--ablation-sequences", type=_int_in(1, 100_000), default=128,
                   help="the first this many of them measure the ablations (default 128)")
    p.add_argument("--probe-seed", type=_seed, default=0, help="PRNG seed of the sequences and the 80/20 split (default 0)")
    p.add_argument("--out", default=None, help="results JSON path (optional: the summary is printed either way)")
    p.add_argument("--plot", default=None, help="optional figure path (png, pdf, svg)")
    p.set_defaults(run=_windtunnel_probe, sub=p)

    p = sub.add_parser("rerun", help="run the experiment a result JSON describes again, and compare its per-seed numbers")
    p.add_argument("result", metavar="RESULT", help="a result JSON written by gradattn (its config, seeds and chunk size)")
    p.add_argument("--out", default=None, help="results JSON path for the new run (optional)")
    p.add_argument("--plot", default=None, help="optional figure path (png, pdf, svg), for experiments with a figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-compilation-cache", action="store_true", help="do not use the persistent compilation cache")
    p.set_defaults(run=_rerun, sub=p)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``gradattn`` command; returns the exit status (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.sub)


if __name__ == "__main__":
    sys.exit(main())
