"""Model names and aliases: the patterns every service checks them against.

A model name is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or a digit.
128 is the registry's column width, and the registry accepted 128 before the trainer's check came
to this one (the trainer used to stop at 64): taking the wider limit leaves every name already
registered valid everywhere. A name becomes one folder name in the registry client's cache
(`<cache>/<name>/v<N>`), well under the usual 255-byte limit; blobs are stored by hash, not name.

An alias (`serving`, `best`) is 1 to 64 of the same characters, starting with a letter, so an
alias can never be read as a version number.

A version number is 1 to VERSION_MAX, the registry's integer column (a signed 32-bit integer).
"""

from __future__ import annotations

import re

NAME_MAX = 128
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$"
ALIAS_MAX = 64
ALIAS_PATTERN = rf"^[A-Za-z][A-Za-z0-9._-]{{0,{ALIAS_MAX - 1}}}$"
VERSION_MAX = 2**31 - 1

_NAME = re.compile(NAME_PATTERN)
_ALIAS = re.compile(ALIAS_PATTERN)


def is_name(name: str) -> bool:
    """Whether `name` is a valid model name."""
    # fullmatch, not match: `$` alone would also accept a name followed by one newline.
    return _NAME.fullmatch(name) is not None


def is_alias(alias: str) -> bool:
    """Whether `alias` is a valid alias."""
    return _ALIAS.fullmatch(alias) is not None
