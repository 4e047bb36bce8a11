"""Which driver runs which configuration: two small tables beside Optuna's, in the study's own database.

Several ``modelpress tune`` drivers may work on one study (a PostgreSQL ``--storage`` they all reach).
Optuna's ``enqueue_trial(skip_if_exists=True)`` checks and then inserts, so two drivers can both pass the
check; a *claim* is instead one row keyed by (study, configuration), and the database's primary key lets
exactly one insert through, whichever driver or machine tried. A claim is kept while its trial runs
and once it completed (or was cut early); it is released when the trial failed or was interrupted, so
that configuration may be tried again, as a one-driver study always allowed.

Every driver registers a *session* row (host, pid) and a thread beats it every :data:`BEAT_S`
seconds. A session is lost when its beat is older than :data:`GRACE_S`, or at once when it ran on
this host and its process is gone (a killed driver on one machine is recovered on the next start):
its running trials are then failed and their configurations run again by a live driver.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any

__all__ = ["BEAT_S", "GRACE_S", "Claims"]

BEAT_S = 2.0
GRACE_S = 20.0


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def _tables(sa: Any) -> tuple[Any, Any, Any]:
    meta = sa.MetaData()
    sessions = sa.Table(
        "modelpress_sessions",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study", sa.String(512), nullable=False, index=True),
        sa.Column("session", sa.String(32), nullable=False, unique=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("beat", sa.Float, nullable=False),
    )
    claims = sa.Table(
        "modelpress_claims",
        meta,
        sa.Column("study", sa.String(512), primary_key=True),
        sa.Column("digest", sa.String(40), primary_key=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("session", sa.String(32), nullable=False),
    )
    return meta, sessions, claims


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """This driver's session in ``study`` and its claims, through its own SQLAlchemy engine on ``url``."""

    def __init__(self, url: str, study: str, session: str):
        import sqlalchemy as sa

        self.sa, self.study, self.session = sa, study, session
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.meta, self.sessions, self.claims = _tables(sa)
        for attempt in range(
            3
        ):  # NOTE: two drivers creating the tables at once: the loser's CREATE fails, the next check sees them
            try:
                self.meta.create_all(self.engine, checkfirst=True)
                break
            except sa.exc.SQLAlchemyError:
                if attempt == 2:
                    raise
                time.sleep(0.2)
        self.host, self.pid = socket.gethostname(), os.getpid()
        with self.engine.begin() as db:
            result = db.execute(
                sa.insert(self.sessions).values(
                    study=study, session=session, host=self.host, pid=self.pid, beat=time.time()
                )
            )
            mine = result.inserted_primary_key[0]  # type: ignore[index]  # NOTE: an insert into a table with a key has one
            # NOTE: the drivers that joined the study before this one: their count seeds this driver's sampler apart from theirs
            self.ordinal = int(
                db.execute(
                    sa.select(sa.func.count())
                    .select_from(self.sessions)
                    .where(self.sessions.c.study == study, self.sessions.c.id < mine)
                ).scalar_one()
            )
        self.seen = self.ordinal + 1
        self._stop = threading.Event()
        self._beater = threading.Thread(
            target=self._beat_loop, name="modelpress-study-beat", daemon=True
        )
        self._beater.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                with self.engine.begin() as db:
                    db.execute(
                        self.sa.update(self.sessions)
                        .where(self.sessions.c.session == self.session)
                        .values(beat=time.time())
                    )
            except (
                self.sa.exc.SQLAlchemyError
            ):  # NOTE: a database hiccup: the next beat tries again (GRACE_S is ten beats)
                pass

    def claim(self, number: int, key: str) -> int | None:
        """Claim ``key`` (a configuration) for trial ``number``: None when this driver got it, else the trial that holds it."""
        sa = self.sa
        try:
            with self.engine.begin() as db:
                db.execute(
                    sa.insert(self.claims).values(
                        study=self.study, digest=_digest(key), number=number, session=self.session
                    )
                )
            return None
        except sa.exc.IntegrityError:
            with self.engine.connect() as db:
                held = db.execute(
                    sa.select(self.claims.c.number).where(
                        self.claims.c.study == self.study, self.claims.c.digest == _digest(key)
                    )
                ).scalar()
            return (
                int(held) if held is not None else self.claim(number, key)
            )  # NOTE: released in between: try again

    def adopt(self, numbers_by_key: dict[str, int]) -> None:
        """Claims for trials that finished before claims existed (a study from an older modelpress), where none is held."""
        sa = self.sa
        with self.engine.begin() as db:
            held = set(
                db.execute(
                    sa.select(self.claims.c.digest).where(self.claims.c.study == self.study)
                ).scalars()
            )
            rows = [
                {"study": self.study, "digest": _digest(k), "number": n, "session": self.session}
                for k, n in numbers_by_key.items()
                if _digest(k) not in held
            ]
            if rows:
                db.execute(sa.insert(self.claims), rows)

    def release(self, key: str, number: int) -> None:
        """Release trial ``number``'s claim on ``key`` (another trial's claim on it stays)."""
        claims = self.claims
        with self.engine.begin() as db:
            db.execute(
                self.sa.delete(claims).where(
                    claims.c.study == self.study,
                    claims.c.digest == _digest(key),
                    claims.c.number == number,
                )
            )

    def live(self) -> set[str]:
        """The sessions of this study that are alive (this one included)."""
        sa, now = self.sa, time.time()
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(
                    self.sessions.c.session,
                    self.sessions.c.host,
                    self.sessions.c.pid,
                    self.sessions.c.beat,
                ).where(self.sessions.c.study == self.study)
            ).all()
        self.seen = len(
            rows
        )  # NOTE: every session that ever joined: a change means another driver came (and may have gone)
        return {
            s
            for s, host, pid, beat in rows
            if s == self.session
            or (now - beat <= GRACE_S and not (host == self.host and not _alive(pid)))
        }

    def close(self) -> None:
        """Stop beating and leave the study: the session row stays (later drivers count it for their sampler's seed), ended;
        this driver's claims stay too (they name trials that ended)."""
        self._stop.set()
        self._beater.join(timeout=5)
        try:
            with self.engine.begin() as db:
                db.execute(
                    self.sa.update(self.sessions)
                    .where(self.sessions.c.session == self.session)
                    .values(beat=0.0)
                )
        finally:
            self.engine.dispose()
