"""Shared command-line front end: argparse flags generated 1:1 from `EncodeConfig`, then `pipeline.run`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import typing

# `ray job submit --working-dir .` and `python jobs/x.py` both run from the project root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from operators.checkpoint import ModelUnavailableError  # noqa: E402
from pipeline.store import DamagedOutputError  # noqa: E402
from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.resources import ResourcesUnavailable  # noqa: E402
from pipeline.run import FramesUnaccounted, OutputBusy, RunFailed, RunSetupError, run  # noqa: E402
from pipeline.runlog import configure_console  # noqa: E402


EXIT_BUSY = 3  # another job holds the output's lease
EXIT_DAMAGED = 4  # committed files of the output cannot be read back whole (see --set-aside-damaged)
EXIT_RETRY = 5  # the run completed, and some inputs failed in ways a later run tries again (run it again)


def build_parser(description: str, defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(EncodeConfig)
    for item in dataclasses.fields(EncodeConfig):
        if item.name == "media":
            continue
        flag = "--" + item.name.replace("_", "-")
        default = defaults.get(item.name, item.default)
        kind = hints[item.name]
        options = {"help": item.metadata["help"], "default": default}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if "choices" in item.metadata:
            options["choices"] = item.metadata["choices"]
        base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
        converter = base[0] if base[0] in (int, float, str) else str
        parser.add_argument(flag, type=converter, required=item.name in ("input", "output"), **options)
    return parser


def main(media: str, description: str, defaults: dict | None = None) -> int:
    parser = build_parser(description, defaults or {})
    args = parser.parse_args()
    try:
        config = EncodeConfig(media=media, **vars(args))
    except ValueError as error:
        parser.error(str(error))
    configure_console(config.log_level)
    # SIGTERM (`ray job stop`, a scheduler, `timeout`) ends the run as Ctrl-C does, so it records itself.
    # Ray's driver installs the same behaviour once it starts; this covers the time before that.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = run(config)
    except ModelUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OutputBusy as error:  # another job writes this output
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BUSY
    except RunSetupError as error:  # a missing input, an unwritable output, settings that clash: nothing written
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:  # its traceback (if it is a fault) is already on the console and in the run's log
        if isinstance(error.__cause__, (DamagedOutputError, ResourcesUnavailable, FramesUnaccounted)):  # said in full
            print(f"error: {error.__cause__}\n(run {error.run_id}, log {error.log})", file=sys.stderr)
            return EXIT_DAMAGED if isinstance(error.__cause__, DamagedOutputError) else 1
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # recorded as interrupted
        print("interrupted", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    return EXIT_RETRY if summary.retryable else 0
