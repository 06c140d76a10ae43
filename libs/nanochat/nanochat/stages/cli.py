"""Command-line handling shared by every stage: options from flags or JSON, the run wrapper, meta.

    python -m nanochat.stages.<name> [--preset tiny] [--config opts.json] [--depth 4 ...]
    python -m nanochat.stages.<name> --print-schema

Each option field `device_batch_size` is the flag `--device-batch-size`; list fields take one or
more values (`--input-version tok:1 --input-version base:2`), booleans `--resume/--no-resume`.
Precedence: preset < config file < flags. Invalid options print ONE line naming the field to
stderr (plus an `error` event on stdout) and exit with code 2, like argparse's own usage errors.

`run_stage` wraps a stage body: `started` event, SIGTERM turned into an `error` event (the body's
`atomic_folder` then removes its temp folder), any exception into an `error` event and exit 1,
`finished` with the body's outputs and metrics.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

import nanochat
from nanochat.report import environment
from nanochat.stages.events import EventEmitter, is_rank_zero
from nanochat.stages.options import PRESETS, OptionsError, StageOptions, preset_options, requires_out, stage_info


class StageInterrupted(Exception):
    """Raised in the main thread when the stage receives SIGTERM or SIGINT."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise OptionsError(message)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def build_parser(stage: str) -> argparse.ArgumentParser:
    """The argparse parser of a stage, one flag per option field."""
    info = stage_info(stage)
    parser = _OneLineParser(prog=f"python -m nanochat.stages.{stage}", description=info.description)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Start from a size preset's options.")
    parser.add_argument("--config", help="JSON file of options (field names as keys).")
    parser.add_argument("--print-schema", action="store_true", help="Print the options' JSON Schema and exit.")
    for name, field in info.options.model_fields.items():
        help_text = field.description or ""
        if field.annotation is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif _is_list(field.annotation):
            parser.add_argument(
                _flag(name), dest=name, action="extend", nargs="+", default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=help_text)
    return parser


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = _flag(loc[0]) if loc else "options"
    where = field + "".join(f"[{p}]" for p in loc[1:])
    extra = f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid option {where}: {first['msg']}{shown}{extra}"


def parse_options(stage: str, argv: Sequence[str] | None = None) -> StageOptions | None:
    """Validated options of a stage; None after printing the schema (--print-schema).

    Raises OptionsError with a one-line message on any bad flag, file or value."""
    info = stage_info(stage)
    args = vars(build_parser(stage).parse_args(argv))
    preset, config, print_schema = args.pop("preset"), args.pop("config"), args.pop("print_schema")
    if print_schema:
        print(json.dumps(info.options.model_json_schema(), indent=2))
        return None
    values: dict[str, Any] = preset_options(preset, stage) if preset else {}
    if config:
        try:
            loaded = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OptionsError(f"--config {config}: cannot read a JSON object ({e})") from e
        if not isinstance(loaded, dict):
            raise OptionsError(f"--config {config}: expected a JSON object of options")
        values.update(loaded)
    values.update(args)
    try:
        return info.options.model_validate(values)
    except ValidationError as e:
        raise OptionsError(_describe(e)) from None


def log(message: str) -> None:
    """Human log line on stderr (rank 0 only)."""
    if is_rank_zero():
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def code_version() -> str:
    """nanochat's version plus the git commit when the code runs from a checkout, with `.dirty`
    when tracked files have uncommitted changes (e.g. `0.1.0+g1a2b3c4d5e6f.dirty`)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(nanochat.__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(sha) and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.TimeoutExpired):
        sha, dirty = "", False
    return f"{nanochat.__version__}+g{sha}{'.dirty' if dirty else ''}" if sha else nanochat.__version__


def build_meta(
    stage: str,
    options: StageOptions,
    registry_stage: str | None,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `meta.json` lineage record of an artifact made by a stage."""
    return {
        "stage": registry_stage,
        "made_by": stage,
        "step": step,
        "metrics": metrics or {},
        "options": options.model_dump(mode="json"),
        "parent": options.input_version[0] if options.input_version else None,
        "inputs": options.input_version,
        "init_from": options.init_from,
        "job_id": options.job_id,
        "code_version": code_version(),
        "hardware": environment(),
        "created": time.time(),
    }


StageBody = Callable[[Any, EventEmitter], tuple[list[dict[str, str]], dict[str, Any]]]


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise StageInterrupted(f"stopped by {signal.Signals(signum).name}")


def _exit_bad_options(stage: str, emitter: EventEmitter, e: OptionsError) -> NoReturn:
    print(f"{stage}: {e}", file=sys.stderr, flush=True)
    emitter.error(str(e))
    sys.exit(2)


def run_stage(stage: str, body: StageBody, argv: Sequence[str] | None = None, rank_zero_only: bool = False) -> None:
    """Parse options, run `body(options, emitter) -> (outputs, metrics)` and emit its events.

    With `rank_zero_only` the other ranks of a torchrun job exit at once (the stage is serial)."""
    emitter = EventEmitter(stage)
    try:
        options = parse_options(stage, argv)
        # Optional in the model (the trainer validates job options without it), required to run.
        if options is not None and requires_out(stage) and not options.out:
            raise OptionsError(f"invalid option --out: required, the folder {stage} writes its output to")
    except OptionsError as e:
        _exit_bad_options(stage, emitter, e)
    if options is None:
        return
    if rank_zero_only and not is_rank_zero():
        return
    emitter = EventEmitter(stage, options.job_id, options.input_version)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    emitter.started(options.model_dump(mode="json"))
    try:
        outputs, metrics = body(options, emitter)
    except StageInterrupted as e:
        log(str(e))
        emitter.error(str(e))
        sys.exit(143)
    except OptionsError as e:
        # Options that pass alone but not together at run time (e.g. the batch for this world size).
        _exit_bad_options(stage, emitter, e)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        emitter.error(f"{type(e).__name__}: {e}")
        sys.exit(1)
    emitter.finished(outputs, metrics)
