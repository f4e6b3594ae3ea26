"""The ``gradattn`` command.

    gradattn em-vs-sgd --seeds N --out results.json [--plot curves.png] [--seed-list 3,7,11]
                       [every field of EmVsSgdConfig and of the task as a flag: --steps, --sgd-lr,
                        --value-lr, --routing-lr, --d-k, --d-v, --init-scale, --grad-source,
                        --seq-len, --self-prob, --noise-std, --embeddings, ...]
                       [--chunk-size K] [--no-progress]
    gradattn deep --seeds N --out deep.json [--plot deep.png] [--fresh-data] [--two-timescale]
                  [every field of DeepConfig and of the task as a flag]
    gradattn laws-check [--n N] [--seed S]

Every argument is checked (sizes against upper bounds too, and that the output files can be
written) before any work starts; bad input gives a one-line error on stderr and exit status 2.
The summary is printed before the files are written; results are written whole or not at all (a
temp file in the same directory, then ``os.replace``), and a failed write is one line naming the
path and the reason, with exit status 1. Ctrl-C stops the command with one line and exit status 130
in any phase (see :mod:`gradattn_launcher`, the console script's entry).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
from matplotlib.figure import Figure

from gradattn import deep, experiments, tasks
from gradattn._checks import MAX_HEAD_SIZE, check_int, check_number, parse_float, parse_int
from gradattn._io import check_output_path, write_json
from gradattn.plotting import plot_em_vs_sgd
from gradattn.provenance import finish, provenance
from gradattn.sweeps import MAX_SEED, seed_key
from gradattn.training import GRAD_SOURCES

MAX_SEEDS = 1_000_000
"""Most seeds one command runs (a million runs of the paper's size is days of CPU time)."""
MAX_RESULT_BYTES = 4 << 30
"""Most bytes of loss curves (seeds x steps x 2 arms x float32) one run may hold."""
MAX_SEQ_LEN = 65_537
"""Longest task sequence (N = 65,536 positions; the blocked pass needs no N x N buffer)."""
MAX_LAWS_CHECK_N = 4096
"""laws-check builds float64 N x N matrices: 4096^2 x 8 bytes = 134 MB each."""


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
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    return parse


def _int_in(minimum: int, maximum: int | None = None):
    rng = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    return _checked(lambda v: check_int("value", v, "cli", minimum=minimum, maximum=maximum), parse_int, f"an integer {rng}")


def _number(**bounds):
    return _checked(lambda v: check_number("value", v, "cli", **bounds), lambda t: parse_float(t, float32=True), "a number")


def _seed(text: str) -> int:
    return _int_in(0, MAX_SEED)(text)


def _seed_list(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        try:
            s = parse_int(part.strip(" "))
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


def _output_path(parser: argparse.ArgumentParser, option: str, path: str) -> str:
    """The regular file ``path`` names (a symlink followed), or exit 2 if it cannot be one."""
    try:
        return check_output_path(path)
    except ValueError as err:
        parser.error(f"{option} {err}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), without the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


_CONFIG_FLAGS = {
    # EmVsSgdConfig field: (type, help)
    "steps": (_int_in(1, 10_000_000), "full-batch updates per arm"),
    "sgd_lr": (_number(minimum=0), "SGD's learning rate on all four matrices"),
    "value_lr": (_number(minimum=0), "EM-like learning rate on W_V"),
    "routing_lr": (_number(minimum=0), "EM-like learning rate on W_Q, W_K, W_O"),
    "d_k": (_int_in(1, MAX_HEAD_SIZE), "query/key size"),
    "d_v": (_int_in(1, MAX_HEAD_SIZE), "value size"),
    "init_scale": (_number(minimum=0, exclusive_minimum=True), "std of the N(0, s^2) initial weights (> 0)"),
    "grad_source": (str, f"gradient path: one of {', '.join(('auto', *GRAD_SOURCES))}"),
}
_TASK_FLAGS = {
    # StickyMarkov field: (type, help)
    "seq_len": (_int_in(2, MAX_SEQ_LEN), "sequence length T (N = T - 1 positions)"),
    "n_symbols": (_int_in(2, 1024), "number of symbols C"),
    "self_prob": (_number(minimum=0, maximum=1, exclusive_maximum=True), "self-transition mass added to the diagonal"),
    "d_embed": (_int_in(1, MAX_HEAD_SIZE), "input size d_in of the symbol means"),
    "embed_seed": (_int_in(0, MAX_SEED), "draw the symbol means from this numpy seed instead of the reference's"),
    "noise_std": (_number(minimum=0, exclusive_minimum=True), "std of the emission noise"),
    "embeddings": (_embeddings, "symbol means: 'reference' (the reference code's; the default at 8 x 20), 'seed:N', or a (C, d) .npy file"),
}


_DEEP_FLAGS = {
    # DeepConfig field: (type, help)
    "steps": (_int_in(1, 10_000_000), "full-batch updates"),
    "lr": (_number(minimum=0), "peak AdamW learning rate (cosine decay to 0)"),
    "weight_decay": (_number(minimum=0), "AdamW weight decay"),
    "clip": (_number(minimum=0, exclusive_minimum=True), "global-norm gradient clipping"),
    "dropout": (_number(minimum=0, maximum=1, exclusive_maximum=True), "dropout rate during training"),
    "d_model": (_int_in(1, MAX_HEAD_SIZE), "model width"),
    "n_layers": (_int_in(1, 64), "transformer blocks"),
    "n_heads": (_int_in(1, 256), "heads per block"),
    "value_lr_multiplier": (_number(minimum=0), "rate ratio on the value projections (needs --two-timescale)"),
    "n_checkpoints": (_int_in(0, 10_000), "per-head dynamics checkpoints (must divide --steps)"),
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _default_text(obj, field: str) -> str:
    val = getattr(obj, field, None)
    return "" if val is None or isinstance(val, np.ndarray) else f" (default {val})"


def _build_task(args, parser) -> tasks.StickyMarkov:
    task_kw = {f: getattr(args, f) for f in _TASK_FLAGS if f != "embeddings" and getattr(args, f) is not None}
    if args.embeddings is not None:
        if "embed_seed" in task_kw:
            parser.error("give either --embeddings or --embed-seed, not both (--embeddings seed:N is --embed-seed N)")
        task_kw.update(args.embeddings)
    try:
        return tasks.StickyMarkov(**task_kw)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def _build_config(args, parser) -> experiments.EmVsSgdConfig:
    task = _build_task(args, parser)
    config_kw = {f: getattr(args, f) for f in _CONFIG_FLAGS if getattr(args, f) is not None}
    try:
        return experiments.EmVsSgdConfig(task=task, **config_kw)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def _outputs(args, parser) -> tuple[str, str | None]:
    """The checked ``--out`` and ``--plot`` targets (exit 2 before any work if they cannot be written)."""
    out = _output_path(parser, "--out", args.out)
    plot = None
    if args.plot is not None:
        plot = _output_path(parser, "--plot", args.plot)
        if os.path.abspath(plot) == os.path.abspath(out):
            parser.error(f"--out {args.out!r} and --plot {args.plot!r} name the same file")
        suffix = os.path.splitext(plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            parser.error(f"argument --plot {args.plot!r}: unsupported figure format {suffix!r}; use one of {', '.join(sorted(formats))}")
    return out, plot


def _check_result_size(parser, n_seeds: int, steps: int, curves: int) -> None:
    result_bytes = n_seeds * steps * curves * 4
    if result_bytes > MAX_RESULT_BYTES:
        parser.error(
            f"{n_seeds} seeds x {steps} steps would hold {result_bytes / 2**30:.1f} GiB of loss curves "
            f"(limit {MAX_RESULT_BYTES / 2**30:.0f} GiB); run fewer seeds per command"
        )


def _report(results: dict, text: str, out: str, plot: str | None, plot_fn) -> int:
    """Print the summary, then write the JSON and the figure; a failed write is one line and exit 1."""
    print(text)
    for path, write in ((out, lambda: write_json(results, out)), (plot, lambda: plot_fn(results, plot))):
        if path is None:
            continue
        try:
            write()
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            print(f"gradattn: error: could not write {path!r}: {reason}; nothing was written there", file=sys.stderr)
            return 1
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


def _seeds(args) -> list[int]:
    return args.seed_list if args.seed_list is not None else list(range(args.seeds))


def _em_vs_sgd(args, parser) -> int:
    seeds = _seeds(args)
    out, plot = _outputs(args, parser)
    config = _build_config(args, parser)
    _check_result_size(parser, len(seeds), config.steps, curves=2)
    prov = provenance()
    results = experiments.em_vs_sgd(seeds, config, chunk_size=args.chunk_size, progress=not args.no_progress)
    results["provenance"] = finish(prov)
    return _report(results, experiments.format_em_vs_sgd(results), out, plot, plot_em_vs_sgd)


def _deep(args, parser) -> int:
    seeds = _seeds(args)
    out, plot = _outputs(args, parser)
    kw = {f: getattr(args, f) for f in _DEEP_FLAGS if getattr(args, f) is not None}
    if args.two_timescale:
        kw["schedule"] = "two_timescale"
    elif args.value_lr_multiplier is not None:
        parser.error("--value-lr-multiplier sets the value projections' rate under --two-timescale; give --two-timescale too")
    try:
        config = deep.DeepConfig(task=_build_task(args, parser), fresh_data=args.fresh_data, **kw)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    _check_result_size(parser, len(seeds), config.steps, curves=1)
    prov = provenance()
    results = deep.deep_experiment(seeds, config, chunk_size=args.chunk_size or 1, progress=not args.no_progress)
    results["provenance"] = finish(prov)
    return _report(results, deep.format_deep(results), out, plot, deep.plot_deep)


def _laws_check(args, parser) -> int:
    errors = experiments.laws_check_errors(seed_key(args.seed), n=args.n)
    width = max(len(k) for k in errors)
    print(f"worst relative error of each law vs autodiff (float64, N = {args.n}, seed {args.seed}):")
    for name, err in errors.items():
        print(f"  {name:<{width}}  {err:.2e}")
    worst = max(errors.values())
    ok = worst < 1e-9
    print(f"{'OK' if ok else 'FAIL'}: worst {worst:.2e} (tolerance 1e-9)")
    return 0 if ok else 1


def _common(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--seeds", type=_int_in(1, MAX_SEEDS), default=5, help="run seeds 0..N-1 (default 5)")
    group.add_argument("--seed-list", type=_seed_list, default=None, help="explicit seeds in [0, 2^64), e.g. 3,7,11")
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--plot", default=None, help="optional figure path (png, pdf, svg)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradattn", description="Gradient dynamics of one attention head.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("em-vs-sgd", help="the paper's EM-like vs SGD experiment on the sticky Markov chain")
    _common(p)
    config, task = experiments.EmVsSgdConfig(), tasks.StickyMarkov()
    for field, (kind, text) in _CONFIG_FLAGS.items():
        p.add_argument(_flag(field), dest=field, type=kind, default=None, help=text + _default_text(config, field))
    for field, (kind, text) in _TASK_FLAGS.items():
        p.add_argument(_flag(field), dest=field, type=kind, default=None, help="task: " + text + _default_text(task, field))
    p.add_argument(
        "--chunk-size", type=_int_in(1, 65_536), default=None,
        help="seeds vmapped per device per call (default: 1 on CPU, 256 on GPU/TPU; results are reproducible per chunk size)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_em_vs_sgd, sub=p)

    p = sub.add_parser("deep", help="the deep transformer on the sticky Markov chain, and the laws of each of its heads")
    _common(p)
    config = deep.DeepConfig()
    for field, (kind, text) in _DEEP_FLAGS.items():
        p.add_argument(_flag(field), dest=field, type=kind, default=None, help=text + _default_text(config, field))
    p.add_argument("--fresh-data", action="store_true", help="a fresh training sequence at every step (default: one fixed sequence)")
    p.add_argument("--two-timescale", action="store_true", help="a larger rate (--value-lr-multiplier) on every value projection")
    for field, (kind, text) in _TASK_FLAGS.items():
        p.add_argument(_flag(field), dest=field, type=kind, default=None, help="task: " + text + _default_text(task, field))
    p.add_argument("--chunk-size", type=_int_in(1, 65_536), default=None, help="seeds vmapped per device per call (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_deep, sub=p)

    p = sub.add_parser("laws-check", help="each first-order law vs autodiff, float64, on a random instance")
    p.add_argument("--n", type=_int_in(1, MAX_LAWS_CHECK_N), default=37, help="sequence length N (default 37)")
    p.add_argument("--seed", type=_seed, default=0, help="PRNG seed in [0, 2^64) (default 0)")
    p.set_defaults(run=_laws_check, sub=p)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``gradattn`` command; returns the exit status (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.sub)


if __name__ == "__main__":
    sys.exit(main())
