"""Numbers written as text (the command line, ``seed:N`` specs): ASCII decimal digits with an
optional sign, no underscores, spaces or other scripts' digits, and finite where runs compute."""

from __future__ import annotations

import math
import re

from gradattn._checks import FLOAT32_MAX, FLOAT32_TINY, float32_underflows

_INT_TEXT = re.compile(r"[+-]?[0-9]+")


_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


_MAX_DIGITS = 1000


def _text_shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_int(text: str) -> int:
    """The integer written in ``text``: ASCII decimal digits ``0-9`` with an optional sign, nothing else.

    Stricter than ``int()``, which also takes surrounding spaces, underscores (``"1_0"`` is 10) and
    every Unicode decimal digit (Arabic-Indic ``"٣"``, full-width ``"３"``).

    Raises:
      TypeError: ``text`` is not a string.
      ValueError: anything else than an optional sign and 1 to 1000 ASCII digits; the message says why.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_int: text must be a string, got {type(text).__name__}")
    if not _INT_TEXT.fullmatch(text):
        raise ValueError(
            f"{_text_shown(text)} is not an integer written in ASCII digits 0-9 (an optional sign; no spaces, "
            "underscores, decimal point or other digits)"
        )
    if len(text.lstrip("+-")) > _MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('+-'))} digits is too large (at most {_MAX_DIGITS} digits)")
    return int(text)


def parse_float(text: str, *, float32: bool = False) -> float:
    """The finite number written in ``text``: ASCII digits, an optional sign, decimal point and exponent.

    Stricter than ``float()``, which also takes ``"nan"``, ``"inf"``, surrounding spaces, underscores
    and non-ASCII digits. With ``float32=True`` the value must also be finite in float32
    (``|x| <= FLOAT32_MAX``): a learning rate of ``1e300`` would be inf once the run casts it; and a
    non-zero value must stay non-zero there: ``1e-50`` would be 0 (a rate of 0, a run that never
    moves), so only ``0`` itself means zero.

    Raises:
      TypeError: ``text`` is not a string.
      ValueError: not such a number, beyond float64's (float32's) finite range, or (with
        ``float32``) non-zero but 0 in float32.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_float: text must be a string, got {type(text).__name__}")
    if len(text) > _MAX_DIGITS or not _FLOAT_TEXT.fullmatch(text):
        raise ValueError(
            f"{_text_shown(text)} is not a finite number written in ASCII (digits 0-9, an optional sign, "
            "decimal point and exponent, as 0.01 or 1e-3)"
        )
    val = float(text)
    if not math.isfinite(val):
        raise ValueError(f"{_text_shown(text)} is beyond the finite range of a float")
    if float32 and abs(val) > FLOAT32_MAX:
        raise ValueError(f"{_text_shown(text)} is beyond float32's finite range (|x| <= {FLOAT32_MAX:.4g}; runs compute in float32)")
    if float32 and float32_underflows(val):
        raise ValueError(
            f"{_text_shown(text)} is not 0 but rounds to 0 in float32 (non-zero values need |x| >= {FLOAT32_TINY:.2g}; "
            "runs compute in float32)"
        )
    return val
