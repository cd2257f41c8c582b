"""Waking gateways' long polls when work for their institution may have arrived.

Within one process a nudge sets an asyncio event the poll waits on. Hub processes that share
a PostgreSQL database also tell each other: each nudge goes out as a NOTIFY on a channel
every hub process LISTENs to, so a transfer queued through one hub wakes, within
milliseconds, a gateway long-polling another. (A short database poll would do it too, but
costs every idle gateway's poll a query every half second: with hundreds of institutions,
thousands of queries a second for nothing.) Nudges are hints only: pollers still look at the
database on a timer, often while no channel joins the processes, rarely once one does.

A nudge has a topic: work to deliver (WORK), or query/retrieve tasks and their answers
(TASKS). Each study crossing nudges its receiver many times; the gateway's task pollers
need not look at the database for each.

The same channel carries revocations (REVOKED): a gateway token revoked through one hub
process is forgotten at once by every other, which would otherwise accept it from its
cache for a few seconds more (hub/auth.py). A process that was not listening forgets all
it cached when it listens again, as a revocation may have gone by meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

CHANNEL = "imagebridge_inbox"
# How often a waiting poll looks at the database anyway.
RECHECK_SECONDS = 0.5  # nothing tells this process what other processes queued
RECHECK_LISTENING_SECONDS = 5.0  # the channel does; this only covers a lost notification
RECONNECT_SECONDS = 2.0
WORK, TASKS, REVOKED = "work", "tasks", "revoked"
Key = tuple[str, int]


class InboxNotifier:
    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus: InboxBus | None = None
        self._alone = False
        self._forget: list[Callable[[], None]] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def connect(self, engine: Engine) -> None:
        """Join the other hub processes on the same PostgreSQL database (none on SQLite)."""
        self._alone = engine.dialect.name == "sqlite"
        if engine.dialect.name == "postgresql" and self._bus is None:
            self._bus = InboxBus(engine, self._heard, self._reconnected)
            self._bus.start()

    def close(self) -> None:
        if self._bus is not None:
            self._bus.stop()
            self._bus = None

    def recheck_seconds(self, topic: str = WORK) -> float:
        """How long a poll waits for a nudge before it looks anyway. Tasks are made only by
        requests to a hub process, each nudging: with one process (SQLite) every nudge
        arrives, and the look is a safety net. Work also comes back when a lease runs out,
        which nothing nudges."""
        listening = self._bus is not None and self._bus.listening
        if listening or (topic == TASKS and self._alone):
            return RECHECK_LISTENING_SECONDS
        return RECHECK_SECONDS

    def event(self, institution_id: int, topic: str = WORK) -> asyncio.Event:
        return self._events.setdefault((topic, institution_id), asyncio.Event())

    def nudge(self, institution_id: int, topic: str = WORK) -> None:
        """Callable from any thread, after the commit that queued the work."""
        self._wake((topic, institution_id))
        if self._bus is not None:
            self._bus.publish((topic, institution_id))

    def on_revoked(self, forget: Callable[[], None]) -> None:
        """Call ``forget`` (from any thread) whenever a credential may have been revoked."""
        self._forget.append(forget)

    def revoked(self) -> None:
        """A credential was revoked, after the commit: every hub process forgets what it
        cached of credentials."""
        self._forget_all()
        if self._bus is not None:
            self._bus.publish((REVOKED, 0))

    def _forget_all(self) -> None:
        for forget in self._forget:
            forget()

    def _heard(self, key: Key) -> None:
        if key[0] == REVOKED:
            self._forget_all()
        else:
            self._wake(key)

    def _reconnected(self) -> None:
        self._forget_all()
        self._wake_all()

    def _wake(self, key: Key) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set, key)

    def _wake_all(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_all)

    def _set(self, key: Key) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def _set_all(self) -> None:
        for key in list(self._events):
            self._set(key)


class InboxBus:
    """NOTIFY and LISTEN on one channel, each in a thread of its own.

    The listener holds a connection of its own outside the pool (a listening connection
    cannot be shared); the publisher borrows pooled ones and sends the nudges waiting, each
    institution once.
    """

    def __init__(
        self, engine: Engine, on_nudge: Callable[[Key], None], on_connect: Callable[[], None]
    ) -> None:
        self.engine = engine
        self.on_nudge = on_nudge
        self.on_connect = on_connect
        self.listening = False
        self._outbox: queue.SimpleQueue[Key | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._listen, name="inbox-listen", daemon=True),
            threading.Thread(target=self._publish, name="inbox-notify", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def publish(self, key: Key) -> None:
        self._outbox.put(key)

    def _publish(self) -> None:
        while (first := self._outbox.get()) is not None:
            wanted = {first}
            while not self._outbox.empty():
                more = self._outbox.get()
                if more is None:
                    self._stop.set()
                    break
                wanted.add(more)
            try:
                with self.engine.connect() as connection:
                    for key in sorted(wanted):
                        connection.execute(
                            text("SELECT pg_notify(:channel, :payload)"),
                            {"channel": CHANNEL, "payload": _payload(key)},
                        )
                    connection.commit()
            except Exception as exc:  # the pollers' timer still finds the work
                log.warning("inbox: could not notify other hub processes: %s", type(exc).__name__)
            if self._stop.is_set():
                return

    def _listen(self) -> None:
        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    # Whatever was sent while this process was not listening: look now.
                    self.on_connect()
                    while not self._stop.is_set():
                        for notice in connection.notifies(timeout=1.0):
                            if (key := _key(notice.payload)) is not None:
                                self.on_nudge(key)
            except psycopg.Error as exc:
                log.warning("inbox: listening for other hub processes failed: %s", exc)
            finally:
                self.listening = False
            self._stop.wait(RECONNECT_SECONDS)


def _payload(key: Key) -> str:
    """A bare institution id for work, as hub processes of every version read it."""
    topic, institution_id = key
    return str(institution_id) if topic == WORK else f"{topic}:{institution_id}"


def _key(payload: str) -> Key | None:
    topic, _, number = payload.rpartition(":")
    if not number.isdigit() or topic not in ("", TASKS, REVOKED):
        return None
    return (topic or WORK, int(number))
