"""The safe calculator behind the chat model's tool calls (NANOCHAT_SPEC "Chat format").

When the model writes `<|python_start|>expr<|python_end|>`, the engine asks `calculate(expr)`
for the text to force as `<|output_start|>text<|output_end|>`; `None` means "force nothing".

The original evaluates the text with Python after three checks: commas are stripped, only the
characters `0123456789*+-/.() ` are allowed, and `**` is refused. This module gives the same
value and the same `str()` text as Python on that character set, without ever handing the text
to Python: a small tokenizer follows Python's number-literal rules (`007` is a syntax error,
`00`, `007.5`, `1.` and `.5` are fine), a recursive-descent parser follows Python's grammar for
`+ - * / //`, unary signs and parentheses (`()` is Python's empty tuple, so `()*3` is `()`), and
the operators are Python's own int/float/tuple operators, so `6/2` is `3.0`, `-7//2` is `-4`
and floats print as Python prints them. Anything Python would reject (syntax errors, division
by zero, a float overflow on int division, a type error) gives `None`.

Bounds, so no input can hang or exhaust memory: at most MAX_CHARS characters, at most
MAX_DEPTH nested parentheses (also well below Python's own parser limit), and no int result
wider than MAX_INT_BITS bits. Without `**` ints grow only by one literal's digits per `*`, so
these caps only refuse inputs far beyond any arithmetic a chat model writes.

Quick check: `python -m nanochat.calculator "1,234 * 2 + 7/2"` prints `2471.5`.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable

ALLOWED = frozenset("0123456789*+-/.() ")
MAX_CHARS = 1000
MAX_DEPTH = 100
MAX_INT_BITS = 2048

Value = int | float | tuple
_BINARY: dict[str, Callable[[Value, Value], Value]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
}


class CalculatorError(ValueError):
    """An expression the calculator refuses, or one that Python would fail to evaluate."""


def tokenize(text: str) -> list[str]:
    """Split `text` into number literals, operators and parentheses, as Python's tokenizer would."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            start = i
            while i < n and text[i].isdigit():
                i += 1
            if i < n and text[i] == ".":
                i += 1
                while i < n and text[i].isdigit():
                    i += 1
            literal = text[start:i]
            # Python's decimal integers have no leading zero unless they are all zeros.
            if "." not in literal and literal[0] == "0" and literal.strip("0"):
                raise CalculatorError(f"leading zeros in the integer literal {literal!r}")
            tokens.append(literal)
        elif text.startswith("//", i):
            tokens.append("//")
            i += 2
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            raise CalculatorError(f"unexpected character {c!r} at position {i}")
    return tokens


class _Parser:
    """Recursive descent over Python's grammar: sum := term (+|- term)*, term := factor (*|/|// factor)*."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def parse(self) -> Value:
        if not self.tokens:
            raise CalculatorError("empty expression")
        value = self.sum()
        if self.pos != len(self.tokens):
            raise CalculatorError(f"unexpected {self.tokens[self.pos]!r} after a complete expression")
        return value

    def sum(self) -> Value:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = _apply(op, value, self.term())
        return value

    def term(self) -> Value:
        value = self.factor()
        while self.peek() in ("*", "/", "//"):
            op = self.take()
            value = _apply(op, value, self.factor())
        return value

    def factor(self) -> Value:
        # Unary signs are gathered in a loop, so a long run of them costs no recursion.
        signs: list[str] = []
        while self.peek() in ("+", "-"):
            signs.append(self.take())
        value = self.atom()
        for sign in reversed(signs):
            value = _unary(sign, value)
        return value

    def atom(self) -> Value:
        token = self.peek()
        if token is None:
            raise CalculatorError("expression ends where a number was expected")
        if token == "(":
            self.take()
            if self.peek() == ")":
                self.take()
                return ()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalculatorError(f"more than {MAX_DEPTH} nested parentheses")
            value = self.sum()
            self.depth -= 1
            if self.peek() != ")":
                raise CalculatorError("unbalanced parenthesis")
            self.take()
            return value
        if token[0].isdigit() or token[0] == ".":
            self.take()
            return float(token) if "." in token else int(token)
        raise CalculatorError(f"unexpected {token!r} where a number was expected")


def _checked(value: Value) -> Value:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"integer result wider than {MAX_INT_BITS} bits")
    return value


def _apply(op: str, left: Value, right: Value) -> Value:
    try:
        return _checked(_BINARY[op](left, right))
    except (ArithmeticError, TypeError) as e:  # ZeroDivisionError, OverflowError, tuple misuse
        raise CalculatorError(f"{type(e).__name__}: {e}") from None


def _unary(sign: str, value: Value) -> Value:
    try:
        return operator.neg(value) if sign == "-" else operator.pos(value)
    except TypeError as e:
        raise CalculatorError(f"TypeError: {e}") from None


def evaluate(expr: str) -> Value:
    """The value Python gives `expr` after the original's checks; CalculatorError when there is none."""
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a str, got {type(expr).__name__}")
    text = expr.replace(",", "")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    bad = sorted(set(text) - ALLOWED)
    if bad:
        raise CalculatorError(f"characters outside {''.join(sorted(ALLOWED))!r}: {bad}")
    if "**" in text:
        raise CalculatorError("'**' is refused")
    return _Parser(tokenize(text)).parse()


def calculate(expr: str) -> str | None:
    """The text the engine forces for a tool call: str(value), or None when evaluation fails."""
    try:
        return str(evaluate(expr))
    except CalculatorError:
        return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit('usage: python -m nanochat.calculator "EXPRESSION"')
    result = calculate(sys.argv[1])
    print("(no result: evaluation failed)" if result is None else result)
