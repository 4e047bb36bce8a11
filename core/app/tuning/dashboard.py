"""A live view of a study: optuna-dashboard's web app, served on 127.0.0.1 from a thread of this process.

modelpress writes no web UI: each trial's figures (metric, size, latency, the configuration, its passes,
status and error) are Optuna user attributes and its objectives carry names, which optuna-dashboard
shows as they are. ``modelpress tune --dashboard`` serves it while the study runs;
``modelpress dashboard OUT_DIR`` (or a storage URL) serves a study, running or finished, until Ctrl-C.
"""

from __future__ import annotations

import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from modelpress.base.errors import ModelpressError, OptionsError

__all__ = ["Dashboard", "study_storage"]

HOST = "127.0.0.1"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = (
        True  # NOTE: a browser's open connection must not keep the process alive after stop()
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # NOTE: one line per request would bury the tune's own log


def study_storage(target: str) -> str:
    """The storage URL of ``target``: a tune's output folder (its ``study.db``) or a storage URL."""
    if "://" in target:
        return target
    db = Path(target) / "study.db"
    if not db.is_file():
        raise OptionsError(
            f"{target}: no study.db in this folder; give a `modelpress tune` output folder or a storage URL "
            "(sqlite:///path/study.db, postgresql://user@host/db)"
        )
    return f"sqlite:///{db.resolve()}"


class Dashboard:
    """optuna-dashboard on ``storage`` (a storage URL), on 127.0.0.1 at ``port`` (0: a free one)."""

    def __init__(self, storage: str, *, port: int = 0):
        try:
            import optuna_dashboard
        except ImportError:
            raise ModelpressError(
                "the dashboard is optuna-dashboard: pip install 'modelpress[distributed]'"
            ) from None
        import optuna

        from modelpress.app.tuning.store import storage_url

        self.storage = optuna.storages.RDBStorage(storage_url(storage))
        try:
            self.server = make_server(
                HOST,
                port,
                optuna_dashboard.wsgi(self.storage),
                server_class=_Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise OptionsError(
                f"cannot serve the dashboard on {HOST}:{port}: {exc}; give another --port (0: a free one)"
            ) from None
        self.port = int(self.server.server_address[1])
        self._thread: threading.Thread | None = None

    def url(self, study_name: str | None = None) -> str:
        """The dashboard's address; with ``study_name``, that study's page."""
        base = f"http://{HOST}:{self.port}/dashboard/"
        if study_name is None:
            return base
        try:
            return f"{base}studies/{self.storage.get_study_id_from_name(study_name)}"
        except KeyError:
            raise OptionsError(
                f"no study named {study_name!r} in this storage; the studies there: "
                f"{', '.join(s.study_name for s in self.storage.get_all_studies()) or 'none'}"
            ) from None

    def studies(self) -> list[str]:
        return [s.study_name for s in self.storage.get_all_studies()]

    def start(self) -> Dashboard:
        """Serve from a daemon thread (the tune goes on in this one)."""
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="modelpress-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serve in this thread until Ctrl-C (KeyboardInterrupt), then close the server."""
        try:
            self.server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server.server_close()
            self.storage.remove_session()

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server.server_close()
        self.storage.remove_session()
