"""Math answer verification: pull out the final answer, then compare numerically or symbolically.

Extraction order (the last occurrence of each wins): `\\boxed{...}`, "answer is X" / "Answer: X", then
the last number in the text. Comparison: exact string after normalisation, then numbers (integers,
decimals, fractions, percentages) within a tolerance, then SymPy equivalence of the difference.

SymPy's `parse_expr` evaluates Python, so only a whitelisted character set of bounded length is
parsed, huge powers are refused before parsing, and simplification runs under a time limit.
"""
from __future__ import annotations

import functools
import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction
from typing import Optional

REL_TOL, ABS_TOL = 1e-6, 1e-9
MAX_EXPR_CHARS = 200
SYMPY_TIMEOUT_S = 2.0

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*(.+)", re.IGNORECASE)
_SAFE_EXPR = re.compile(r"^[0-9a-zA-Z_+\-*/^().,\s]*$")
_BIG_POWER = re.compile(r"(\*\*|\^)\s*\(?\s*[-+]?\d{4,}")


def last_boxed(text: str) -> Optional[str]:
    """Contents of the last \\boxed{...} (or \\fbox{...}), matching nested braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None


def extract_final_answer(text: str) -> Optional[str]:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_IS.findall(text)
    if matches:
        # The answer runs to the end of its sentence: "The answer is 3. Wait, ..." -> "3" ("3.5" stays whole).
        answer = re.split(r"\.(?:\s|$)|\n", matches[-1].strip())[0]
        answer = answer.strip().strip("$").strip()
        if answer:
            return answer
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


_LATEX_REPLACEMENTS = [
    (r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))"),
    (r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)"),
    (r"\\(?:left|right|displaystyle|,|;|!|\s)", ""),
    (r"\\(?:cdot|times)", "*"),
    (r"\\pi", "pi"),
    (r"\{", "("), (r"\}", ")"),
    (r"\$", ""), (r"\\%|%", "/100"),
    (r"^\s*[a-zA-Z]\s*=\s*", ""),  # "x = 3" answers compare by their right-hand side
]


def normalize_answer(text: str) -> str:
    text = str(text).strip().strip(".")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    for _ in range(3):  # nested fractions such as \frac{\frac{1}{2}}{3}
        for pattern, repl in _LATEX_REPLACEMENTS[:2]:
            text = re.sub(pattern, repl, text)
    for pattern, repl in _LATEX_REPLACEMENTS[2:]:
        text = re.sub(pattern, repl, text)
    return " ".join(text.split())


def as_number(text: str) -> Optional[Fraction]:
    """A plain number ("1,000", "-3.5", "3/4", "(3)/(4)", "50/100") as an exact Fraction."""
    compact = text.replace(" ", "").replace(",", "")
    compact = re.sub(r"\((-?[\d.]+)\)", r"\1", compact)
    m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+))(?:/([-+]?(?:\d+\.?\d*|\.\d+)))*", compact)
    if not m:
        return None
    parts = compact.split("/")
    try:
        value = Fraction(parts[0])
        for denominator in parts[1:]:
            value /= Fraction(denominator)
        return value
    except (ValueError, ZeroDivisionError):
        return None


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit; outside the main thread the length/power guards are the only bound."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _to_sympy(text: str):
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)
    if len(text) > MAX_EXPR_CHARS or not _SAFE_EXPR.match(text) or _BIG_POWER.search(text) or "__" in text:
        return None
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(text.replace(",", ""), local_dict={}, global_dict=_sympy_namespace(),
                      transformations=transformations, evaluate=True)


@functools.lru_cache(maxsize=1)
def _sympy_names() -> tuple:
    namespace: dict = {}
    exec("from sympy import *", namespace)  # noqa: S102 - a fixed import, not user input
    return tuple(namespace.items())


def _sympy_namespace() -> dict:
    """SymPy's names and no Python builtins, so a parsed answer cannot reach open(), exec(), ..."""
    namespace = dict(_sympy_names())
    namespace["__builtins__"] = {}
    return namespace


def symbolic_equal(a: str, b: str, timeout_s: float = SYMPY_TIMEOUT_S) -> bool:
    import sympy
    import sympy.parsing.sympy_parser  # noqa: F401 - imported before the alarm can interrupt an import
    _sympy_names()
    try:
        with _time_limit(timeout_s):
            x, y = _to_sympy(a), _to_sympy(b)
            if x is None or y is None:
                return False
            difference = sympy.simplify(x - y)
            if difference == 0:
                return True
            if difference.free_symbols:
                return False
            value = complex(sympy.N(difference))
            scale = max(abs(complex(sympy.N(y))), 1.0)
            return abs(value) <= REL_TOL * scale
    except Exception:  # noqa: BLE001 - any parse/simplify failure (or timeout) means "not shown equal"
        return False


def answers_equal(predicted: Optional[str], gold) -> bool:
    if predicted is None:
        return False
    p, g = normalize_answer(predicted), normalize_answer(str(gold))
    if not p:
        return False
    if p == g:
        return True
    pn, gn = as_number(p), as_number(g)
    if pn is not None and gn is not None:
        return abs(pn - gn) <= max(REL_TOL * abs(gn), ABS_TOL)
    return symbolic_equal(p, g)


def math_reward(text: str, answer) -> float:
    """1.0 if the final answer in `text` equals `answer` (a string, a number, or a list of accepted forms)."""
    golds = answer if isinstance(answer, (list, tuple)) else [answer]
    predicted = extract_final_answer(text)
    return float(any(answers_equal(predicted, g) for g in golds))
