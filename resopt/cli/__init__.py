"""The ``resopt`` command line: one small module per subcommand, registered here in pipeline order.

Importing this module must stay cheap (no torch, onnxruntime or tensorrt): ``resopt --help`` answers in a
fraction of a second. Each command imports its library inside its body.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer

from resopt import __version__
from resopt.errors import ResoptError

# (name, module, function): pipeline order is help order.
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "resopt.cli.train", "train_cmd"),
    ("distill", "resopt.cli.distill", "distill_cmd"),
    ("import", "resopt.cli.importer", "import_cmd"),
    ("prune", "resopt.cli.prune", "prune_cmd"),
    ("export", "resopt.cli.export", "export_cmd"),
    ("quantize", "resopt.cli.quantize", "quantize_cmd"),
    ("build", "resopt.cli.build", "build_cmd"),
    ("bench", "resopt.cli.bench", "bench_cmd"),
    ("report", "resopt.cli.report", "report_cmd"),
    ("info", "resopt.cli.info", "info_cmd"),
    ("env", "resopt.cli.env", "env_cmd"),
]

app = typer.Typer(
    name="resopt",
    help="Train, compress, export, quantize, build and benchmark ResNet-family image classifiers.\n\n"
    "Example: resopt train --arch resnet20 --data cifar10 -o r20.pt && resopt export r20.pt -o r20.onnx",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Train, compress, export, quantize, build and benchmark ResNet-family image classifiers."""


for _name, _module, _func in COMMANDS:
    app.command(_name)(getattr(importlib.import_module(_module), _func))


def report_error(e: BaseException) -> int:
    """Print a one-line error (and hint) to stderr; return the exit code."""
    if isinstance(e, ResoptError):
        msg, hint, code = e.message, e.hint, e.exit_code
    else:  # OSError: permission denied, ...
        msg, hint, code = f"{type(e).__name__}: {e}", "set RESOPT_DEBUG=1 for the traceback", 1
    sys.stderr.write(f"Error: {msg}\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")
    return code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temporary files) runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """Click's ``(ClickException, UsageError)`` through Typer's public API: ``typer.BadParameter`` is Click's
    ``BadParameter``, a ``UsageError`` and a ``ClickException``, so its bases are the classes to catch. Typer
    >= 0.26 vendors Click privately (``typer._click``, unsupported for outside use); an older Typer re-exports
    the ``click`` package's own classes: the same lookup finds either."""
    bases = {c.__name__: c for c in typer.BadParameter.__mro__}
    return bases["ClickException"], bases["UsageError"]


def _usage_error(e: Exception) -> int:
    """Click's usage errors as our one line first (Click prints usage lines before ``Error:``)."""
    click_exception, usage_error = _click_exceptions()
    ctx: Any = getattr(e, "ctx", None)
    if any(c.__name__ == "NoArgsIsHelpError" for c in type(e).__mro__):  # Click >= 8.2: no public name for it
        sys.stderr.write(ctx.get_help() + "\n" if ctx else str(e))
        return 2
    assert isinstance(e, click_exception)
    sys.stderr.write(f"Error: {e.format_message()}\n")  # type: ignore[attr-defined]
    if isinstance(e, usage_error):
        cmd = ctx.command_path if ctx else "resopt"
        sys.stderr.write(f"Hint: {cmd} --help\n")
    return int(e.exit_code)  # type: ignore[attr-defined]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (tests call this in-process)."""
    import signal
    import threading

    click_exception, _ = _click_exceptions()
    debug = os.environ.get("RESOPT_DEBUG", "") not in ("", "0")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(args=argv, prog_name="resopt", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click_exception as e:
        return _usage_error(e)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("Error: interrupted; no partial file was left\n")
        return 130
    except Terminated:
        sys.stderr.write("Error: terminated by SIGTERM; no partial file was left\n")
        return 143
    except (ResoptError, OSError) as e:
        if debug:
            raise
        return report_error(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main() -> None:
    sys.exit(run())
