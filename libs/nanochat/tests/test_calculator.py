"""The calculator agrees with Python's arithmetic on the allowed characters and stays bounded.

Python's eval is the oracle here, in the test only, on generated expressions.
"""

import random
import warnings

import pytest
from nanochat.calculator import ALLOWED, MAX_CHARS, MAX_DEPTH, CalculatorError, calculate, evaluate


def python_says(expr: str) -> str | None:
    """What the original calculator forces: str(eval(text)) after its checks, None on any failure."""
    text = expr.replace(",", "")
    if any(c not in ALLOWED for c in text) or "**" in text:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "2(3)" warns that an int is not callable
            return str(eval(text, {"__builtins__": {}}))
    except Exception:
        return None


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("7*3", "21"),
        ("6/2", "3.0"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7.5//2", "3.0"),
        ("1/3", "0.3333333333333333"),
        ("0.1+0.2", "0.30000000000000004"),
        ("1,234,567 * 2", "2469134"),
        ("-(3 - 5) * +2", "4"),
        ("- - -1", "-1"),
        ("-0.", "-0.0"),
        ("00", "0"),
        ("007.5", "7.5"),
        (".5 + 1.", "1.5"),
        ("12345678901234567890 * 98765432109876543210", str(12345678901234567890 * 98765432109876543210)),
        ("10/4", "2.5"),
        ("()", "()"),
        ("() * 3", "()"),
        ("(()) + ()", "()"),
        ("  2 + 2  ", "4"),
    ],
)
def test_known_values(expr: str, expected: str) -> None:
    assert calculate(expr) == expected
    assert python_says(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "1/0",
        "1//0",
        "5.0/0",
        "1.5.2",
        "007",
        "2**10",
        "2 * * 3",
        "6 / / 2",
        "3 % 2",
        "abc",
        "__import__('os')",
        "",
        "   ",
        "(1",
        "1)",
        "1 2",
        "2(3)",
        "()()",
        "-()",
        "() / 2",
        "() * 1.5",
        "1..",
        ". 5",
        "1+",
        "*2",
        "(1+2",
        "1e5",
        "1" * 400 + "/ 3",  # int too large to convert to float
    ],
)
def test_failures_give_none_like_python(expr: str) -> None:
    assert calculate(expr) is None
    assert python_says(expr) is None


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """An expression from the allowed alphabet, mostly well-formed but with Python's edge cases."""
    roll = rng.random()
    if depth > 3 or roll < 0.35:
        kind = rng.randrange(8)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4)))
        if kind == 0:
            return digits + "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 3)))
        if kind == 1:
            return "." + digits
        if kind == 2:
            return "0" * rng.randint(1, 3) + digits[: rng.randint(0, 2)]  # all zeros, or a leading-zero error
        if kind == 3:
            return "".join(rng.choice("0123456789") for _ in range(rng.randint(10, 25)))  # big ints
        if kind == 4:
            return "()"
        return digits.lstrip("0") or "0"
    if roll < 0.5:
        return rng.choice(["-", "+", "- ", "--", "-+"]) + random_expression(rng, depth + 1)
    if roll < 0.65:
        return "(" + random_expression(rng, depth + 1) + ")"
    op = rng.choice(["+", "-", "*", "/", "//", " + ", " * ", " // ", " / "])
    return random_expression(rng, depth + 1) + op + random_expression(rng, depth + 1)


def test_matches_python_on_generated_expressions() -> None:
    rng = random.Random(0)
    outcomes = {"value": 0, "failure": 0}
    for _ in range(5000):
        expr = random_expression(rng)
        expected = python_says(expr)
        assert calculate(expr) == expected, expr
        outcomes["value" if expected is not None else "failure"] += 1
    # The generator must exercise both sides, or the comparison above proves little.
    assert outcomes["value"] > 1000 and outcomes["failure"] > 500, outcomes


def test_matches_python_on_random_character_soup() -> None:
    rng = random.Random(1)
    alphabet = "0123456789*+-/.() ,"
    for _ in range(5000):
        expr = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert calculate(expr) == python_says(expr), expr


def test_bounded_inputs_fail_cleanly() -> None:
    with pytest.raises(CalculatorError, match="longer than"):
        evaluate("1+" * MAX_CHARS + "1")
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(CalculatorError, match="nested"):
        evaluate(deep)
    assert calculate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == "1"
    # Products of long literals: refused by the int-width cap, never slow.
    huge = "*".join(["9" * 120] * 8)
    assert calculate(huge) is None
    assert calculate("-" * (MAX_CHARS - 1) + "1") == "-1"
    with pytest.raises(CalculatorError, match="must be a str"):
        evaluate(12)  # type: ignore[arg-type]
