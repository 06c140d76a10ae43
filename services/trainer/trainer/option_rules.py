"""What the trainer allows in stage options beyond each stage's own validation: the workers fetch
what a job's URL options name and read the folders its path options name, so a job may name only
http(s) URLs and folders under the data root (`data_root`, by default `data_dir`).

A path option's own default is always allowed (make_data's docs_path is Debian's python docs
folder): the operator's image chose it, not the request.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nanochat.stages.options import STAGES

from trainer.settings import Settings

URL_OPTIONS = ("fineweb_url", "datasets_url", "core_bundle_url")
# Option -> whether a relative value is taken relative to the data folder (else it is refused).
PATH_OPTIONS = {"docs_path": False, "bundle": True}


def option_errors(settings: Settings, steps: list[dict[str, Any]], per_stage: bool) -> list[dict[str, Any]]:
    """FastAPI-style errors for every URL or path option of `steps` the trainer refuses; `per_stage`
    for a pipeline, whose options the request keys by stage."""
    root = Path(os.path.abspath(settings.data_root or settings.data_dir))
    errors = []
    for step in steps:
        fields = STAGES[step["stage"]].options.model_fields
        loc = ["body", "options", *([step["stage"]] if per_stage else [])]
        for name, value in step["options"].items():
            if not isinstance(value, str) or value == fields[name].default:
                continue
            if name in URL_OPTIONS:
                problem = _url_problem(value)
            elif name in PATH_OPTIONS:
                problem = _path_problem(value, root, PATH_OPTIONS[name])
            else:
                continue
            if problem:
                errors.append({"loc": [*loc, name], "msg": problem, "type": "value_error"})
    return errors


def unencodable_at(value: Any, loc: list[str | int]) -> list[str | int] | None:
    """Where in `value` (dict keys included) a string holds a lone surrogate, which JSON can carry
    (`"\\ud800"`) but no UTF-8 text can: such a request could be neither hashed nor stored."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return loc
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = unencodable_at(key, [*loc, "<key>"]) or unencodable_at(item, [*loc, key])
        if found:
            return found
    return None


def _url_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        host, _ = parts.hostname, parts.port  # .port raises on a port that is no number or out of range
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL with a host"
    return None


def _path_problem(value: str, root: Path, relative_to_root: bool) -> str | None:
    if "\x00" in value:
        return "must not hold a NUL byte"
    if ".." in Path(value).parts:
        return "must not hold '..'"
    if not posixpath.isabs(value):
        return None if relative_to_root else f"must be an absolute path under the data root {root}"
    if not Path(os.path.normpath(value)).is_relative_to(root):
        return f"must lie under the data root {root}"
    return None
