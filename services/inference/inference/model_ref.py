"""What a request's `model` string names: the served version, one registry version, or an alias.

    <name>            the served version (the serving alias, else the serving rule; follows hot swaps)
    <name>:<version>  exactly that registry version (`nanochat:3`)
    <name>@<alias>    the version the alias points at when the request arrives (`nanochat@best`)

A model name never holds `:` or `@` (`nanochat_contracts.names`), so the three forms cannot be
confused. Answers name the version that answered as `<name>:<version>` (`model_id`).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat_contracts.names import VERSION_MAX, is_alias, is_name


class BadModelRef(ValueError):
    """The `model` string is in none of the three forms."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def served(self) -> bool:
        """Whether it means whatever version the server serves now."""
        return self.version is None and self.alias is None


def parse_model_ref(model: str) -> ModelRef:
    """`<name>`, `<name>:<version>` or `<name>@<alias>` as a ModelRef; BadModelRef for anything else."""
    form = f"expected <name>, <name>:<version> (an integer in [1, {VERSION_MAX}]) or <name>@<alias>"
    if ":" in model:
        name, _, number = model.partition(":")
        # isdecimal, not int(): int() takes "+3", " 3" and "3_0", which name no version spelled so;
        # the length first: int() refuses a string of over 4300 digits with its own ValueError.
        digits = number.isascii() and number.isdecimal() and len(number) <= len(str(VERSION_MAX))
        if not (is_name(name) and digits and 0 < int(number) <= VERSION_MAX):
            raise BadModelRef(f"model {model!r} is not valid: {form}")
        return ModelRef(name, version=int(number))
    if "@" in model:
        name, _, alias = model.partition("@")
        if not (is_name(name) and is_alias(alias)):
            raise BadModelRef(f"model {model!r} is not valid: {form}")
        return ModelRef(name, alias=alias)
    if not is_name(model):
        raise BadModelRef(f"model {model!r} is not valid: {form}")
    return ModelRef(model)


def model_id(name: str, version: int | None) -> str:
    """How answers name a loaded model: `<name>:<version>`, or the bare name of an unversioned folder."""
    return name if version is None else f"{name}:{version}"
