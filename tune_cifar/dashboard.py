"""Open a study's Optuna database in optuna-dashboard: ``python -m tune_cifar.dashboard STUDY [--port N]``.

``STUDY/optuna.db`` holds every trial as Optuna saw it (COMPLETE, PRUNED for the trials ASHA
stopped, FAIL), with each epoch's validation accuracy as an intermediate value. This serves
the optuna-dashboard web UI on it, bound to 127.0.0.1: the dashboard can rename and delete
studies and trials, and nobody but this machine's user should reach that. From another machine,
forward the port (``ssh -L 8080:127.0.0.1:8080 HOST``).

optuna-dashboard is an optional extra (``pip install -e '.[dashboard]'``): the study itself
never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tune_cifar import cli
from tune_cifar.errors import UsageError
from tune_cifar.study_folder import StudyFolder

HOST = "127.0.0.1"  # loopback only: the dashboard writes to the database (rename, delete, notes)
DEFAULT_PORT = 8080  # optuna-dashboard's own default


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, as optuna-dashboard's own command serves: the page loads several at once."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request: the page polls the study every few seconds, which would bury the address."""


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python -m tune_cifar.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study folder (holds optuna.db)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    return parser.parse_args(argv)


def database(study: str | Path) -> StudyFolder:
    """The study folder, once its Optuna database is there; else a one-line error saying what is wrong."""
    folder = StudyFolder(Path(study))
    if not folder.optuna_db.is_file():
        raise UsageError(
            f"{study}: no {StudyFolder.OPTUNA_DB} (expected {folder.optuna_db}); is this a tune-cifar study folder?"
        )
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be between 1 and 65535")
    folder = database(args.study)
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError("optuna-dashboard is not installed: pip install -e '.[dashboard]'") from None
    app = optuna_dashboard.wsgi(folder.optuna_url)
    try:  # bind first, so that the address printed is one that answers
        server = make_server(HOST, args.port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:  # the port is taken (or not ours to bind): say so, not a traceback
        raise UsageError(f"--port {args.port}: cannot serve on {HOST}:{args.port} ({exc.strerror or exc})") from None
    with server:
        url = f"http://{HOST}:{args.port}/dashboard"
        print(f"optuna-dashboard for {folder.optuna_db} at {url} (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # the way to stop a server: not an error
            print("dashboard stopped", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
