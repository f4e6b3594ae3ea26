"""The ``gradattn`` command.

    gradattn em-vs-sgd --seeds N --steps S --out results.json [--plot curves.png]
                       [--seed-list 3,7,11] [--seq-len T] [--init-scale S] [--chunk-size K] [--no-progress]
    gradattn laws-check [--n N] [--seed S]

Every argument is checked (including that the output files can be written) before any work starts;
bad input gives a one-line error on stderr and exit status 2. Results are written whole or not at
all (a temp file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

from gradattn._io import atomic_write


def _int_at_least(minimum: int, name: str):
    """An argparse type: an integer >= ``minimum``, described as ``name`` in its error."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {name} integer, got {text!r}") from None
        if val < minimum:
            raise argparse.ArgumentTypeError(f"must be a {name} integer, got {val}")
        return val

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _seed_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    seeds = []
    for p in parts:
        try:
            s = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated non-negative integers like 3,7,11, got {text!r}") from None
        if s < 0:
            raise argparse.ArgumentTypeError(f"seeds must be non-negative, got {s} in {text!r}")
        seeds.append(s)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def _writable_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """Fail (exit 2) unless ``path`` can be created or replaced by a file."""
    if os.path.isdir(path):
        parser.error(f"{option} {path!r} is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parser.error(f"{option} {path!r}: directory {directory!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".gradattn-check-"):
            pass
    except OSError as err:
        parser.error(f"{option} {path!r}: cannot write in directory {directory!r} ({err.strerror or err})")


def _finite_json(obj):
    """``obj`` with every non-finite float (a diverged run) replaced by None, i.e. JSON null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` whole or not at all (NaN and inf are written as null)."""

    def write(f):
        json.dump(_finite_json(obj), f, indent=1, allow_nan=False)
        f.write("\n")

    atomic_write(path, write, suffix=".json")


def format_em_vs_sgd(results: dict) -> str:
    """A short text table of an EM-vs-SGD result."""
    lines = [
        f"EM-like vs SGD on the sticky Markov chain: {len(results['seeds'])} seeds, {results['steps']} steps, "
        f"H_min = {results['h_min']:.4f} nats",
        f"{'arm':<8} {'final loss':>16} {'entropy':>9} {'accuracy':>9}",
    ]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(
            f"{label:<8} {r['final_loss_mean']:>8.4f} ± {r['final_loss_std']:<5.3f} "
            f"{r['final_entropy_mean']:>9.4f} {r['final_accuracy_mean']:>9.4f}"
        )
    s = results["em_steps_to_sgd_final"]
    speed = results["speedup"]
    p = results["p_value"]
    lines.append(
        f"EM-like reaches SGD's mean final loss in {s['mean']:.0f} ± {s['std']:.0f} steps: "
        f"speed-up {'n/a' if speed is None else f'{speed:.2f}x'}; "
        f"paired t-test p = {'n/a' if p is None else f'{p:.2g}'}"
    )
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def _em_vs_sgd(args, parser) -> int:
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if args.seq_len < 2:
        parser.error(f"argument --seq-len: must be at least 2 (N = T - 1 positions), got {args.seq_len}")
    _writable_file(parser, "--out", args.out)
    if args.plot is not None:
        _writable_file(parser, "--plot", args.plot)
        from matplotlib.figure import Figure

        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            parser.error(f"argument --plot {args.plot!r}: unsupported figure format {suffix!r}; use one of {', '.join(sorted(formats))}")

    from gradattn.experiments import em_vs_sgd
    from gradattn.tasks import StickyMarkov

    task = StickyMarkov(seq_len=args.seq_len)
    results = em_vs_sgd(
        seeds,
        steps=args.steps,
        task=task,
        init_scale=args.init_scale,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    write_json_atomic(results, args.out)
    if args.plot is not None:
        from gradattn.plotting import plot_em_vs_sgd

        plot_em_vs_sgd(results, args.plot)
    print(format_em_vs_sgd(results))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _laws_check(args, parser) -> int:
    import jax

    from gradattn.experiments import laws_check_errors

    errors = laws_check_errors(jax.random.key(args.seed), n=args.n)
    width = max(len(k) for k in errors)
    print(f"worst relative error of each law vs autodiff (float64, N = {args.n}, seed {args.seed}):")
    for name, err in errors.items():
        print(f"  {name:<{width}}  {err:.2e}")
    worst = max(errors.values())
    ok = worst < 1e-9
    print(f"{'OK' if ok else 'FAIL'}: worst {worst:.2e} (tolerance 1e-9)")
    return 0 if ok else 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), without the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _non_negative_float(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}") from None
    if not (val >= 0 and val != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text!r}")
    return val


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradattn", description="Gradient dynamics of one attention head.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("em-vs-sgd", help="the paper's EM-like vs SGD experiment on the sticky Markov chain (SPEC §3)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--seeds", type=_positive_int, default=5, help="run seeds 0..N-1 (default 5)")
    group.add_argument("--seed-list", type=_seed_list, default=None, help="explicit seeds, e.g. 3,7,11")
    p.add_argument("--steps", type=_positive_int, default=1000, help="updates per arm (default 1000)")
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--plot", default=None, help="optional figure path (png, pdf, svg)")
    p.add_argument("--init-scale", type=_non_negative_float, default=0.1, help="std of the N(0, s^2) initial weights (default 0.1)")
    p.add_argument("--seq-len", type=_positive_int, default=2000, help="sequence length T of the task (default 2000)")
    p.add_argument(
        "--chunk-size", type=_positive_int, default=1, help="seeds vmapped per device per call (default 1; results are reproducible per chunk size)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_em_vs_sgd, sub=p)

    p = sub.add_parser("laws-check", help="each first-order law vs autodiff, float64, on a random instance")
    p.add_argument("--n", type=_positive_int, default=37, help="sequence length N (default 37)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="PRNG seed (default 0)")
    p.set_defaults(run=_laws_check, sub=p)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``gradattn`` command; returns the exit status (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.sub)


if __name__ == "__main__":
    sys.exit(main())
