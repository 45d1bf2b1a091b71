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
    ("optimize", "resopt.cli.optimize", "optimize_cmd"),
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


class Interrupted(BaseException):
    """SIGINT, raised by resopt's own handler: Typer turns a KeyboardInterrupt into a silent exit 130 before
    ``run`` could print its line, so Ctrl-C never reaches us as one."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temporary files) runs as for Ctrl-C."""


_MAIN_PID = os.getpid()
# Signals that arrived after the command's output was in place (deferred: the command finishes).
_DEFERRED: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    """Stop the command, unless its output is already in place: then let it finish (exit 0).

    Once an output has been renamed onto its path, the previous file there is gone, so the command can no
    longer be rolled back; stopping it would exit 130 with the new file left, and a script would see
    "interrupted" and an output. What is left after that point (the sidecar, the result table) takes
    moments, so the command completes and says that the signal came too late to stop it.
    """
    import signal

    if os.getpid() != _MAIN_PID:  # a forked worker (DataLoader) inherits the handler: behave as Python would
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    from resopt.artifacts import outputs_placed

    if outputs_placed():
        _DEFERRED.append(signum)
        return
    raise Interrupted() if signum == signal.SIGINT else Terminated()


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

    from resopt.artifacts import outputs_placed, reset_outputs_placed

    click_exception, _ = _click_exceptions()
    debug = os.environ.get("RESOPT_DEBUG", "") not in ("", "0")
    previous: dict[int, Any] = {}
    reset_outputs_placed()
    _DEFERRED.clear()
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
        # Only where Ctrl-C would interrupt at all: a background job started with SIGINT ignored keeps it so.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        code = app(args=argv, prog_name="resopt", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click_exception as e:
        return _usage_error(e)
    except (typer.Abort, KeyboardInterrupt, Interrupted):
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if _DEFERRED:
        name = "SIGINT" if _DEFERRED[0] == signal.SIGINT else "SIGTERM"
        placed = outputs_placed()
        sys.stderr.write(f"Warning: {name} arrived after {placed[0]} was written; the command finished "
                         f"(exit {code}) instead of leaving a half-done result\n")
    return code


def main() -> None:
    sys.exit(run())
