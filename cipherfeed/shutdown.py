"""How a service process stops: the first SIGINT or SIGTERM starts a drain that has a deadline, a
second one ends the process at once, and a watchdog ends it (after writing every thread's stack to
the log) if the drain, or the interpreter's own exit after it, outlasts that deadline.

Ending a service early is safe because each of them acknowledges only what is already durable: the
ledger answers an append once its group commit is on disk, the key service once its transaction is
committed, the recommender's Score once the receipt is in its spool. A stop cut short is a crash,
and every store is built (and tested, with SIGKILL) to recover from one.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import socket
from types import FrameType

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Inside Kubernetes' termination grace period (30 s for the ledger and the key service, 60 s for
# the recommender): the process ends by itself, with its stacks logged, before kubelet kills it.
DEFAULT_DEADLINE = 25.0


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: present only so that the C handler writes the signal's number to
    the wakeup socket. It takes no lock (see ``SignalWait``)."""


class SignalWait:
    """SIGINT/SIGTERM for the main thread to wait on, from when it is made.

    The signal's number arrives through ``signal.set_wakeup_fd``, written by the C-level handler in
    whichever thread the kernel delivered the signal to. The Python handler does nothing: calling
    ``threading.Event.set()`` there (as this module's predecessor did) deadlocks when the signal
    lands while the main thread holds that Event's own lock, on entering or leaving ``wait()``:
    signal handlers run in the main thread, between two of its bytecodes, and that lock is not
    reentrant. Must be made and used in the main thread.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the C handler must never block on a full buffer
        # The socket first, then the handlers: a signal from here on is never missed.
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _noted) for sig in SIGNALS}

    def wait(self) -> signal.Signals:
        """Blocks until SIGINT or SIGTERM (other signals' bytes, if any, are skipped)."""
        received = self._receive(None)
        assert received is not None  # no timeout: only a signal ends the wait
        return received

    def wait_for(self, seconds: float) -> signal.Signals | None:
        """As ``wait``, for at most ``seconds``: None if no SIGINT or SIGTERM came by then."""
        return self._receive(seconds)

    def _receive(self, timeout: float | None) -> signal.Signals | None:
        self._reader.settimeout(timeout)
        while True:
            try:
                received = self._reader.recv(64)
            except TimeoutError:
                return None
            for number in received:
                if number in SIGNALS:
                    return signal.Signals(number)

    def close(self) -> None:
        """Puts back the previous handlers and wakeup fd."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()


def begin_bounded_stop(received: signal.Signals, deadline: float = DEFAULT_DEADLINE) -> None:
    """After the first signal: a second SIGINT/SIGTERM now ends the process at once (the kernel's
    default action, which needs nothing from this process), and if it is still alive ``deadline``
    seconds from now, faulthandler's watchdog (a C thread, it needs neither the GIL nor any lock)
    writes every thread's stack to stderr, the log, and exits with status 1. It stays armed through
    the interpreter's exit, which joins non-daemon threads without a timeout."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    faulthandler.dump_traceback_later(deadline, exit=True)
    log.info(
        "stopping on %s: a second signal ends the process at once; after %.0f s it ends anyway,"
        " with every thread's stack in this log",
        received.name,
        deadline,
    )
