"""The signal wait that services and ``cipherfeed mesh up`` stop on (cipherfeed/shutdown.py)."""

from __future__ import annotations

import os
import signal

from cipherfeed.shutdown import SignalWait


def test_wait_for_gives_none_without_a_signal_and_the_signal_once_one_came():
    previous = signal.getsignal(signal.SIGTERM)
    signals = SignalWait()
    try:
        assert signals.wait_for(0.01) is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread: no lock taken
        assert signals.wait_for(5) is signal.SIGTERM
        assert signals.wait_for(0.01) is None  # consumed once
    finally:
        signals.close()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_handler_installed_over_it_still_wakes_the_wait():
    """``mesh up`` puts its own start-up handler over SignalWait's: the wakeup socket still gets
    the signal, whichever Python handler runs."""
    signals = SignalWait()
    seen: list[int] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.wait_for(5) is signal.SIGINT
        assert seen == [signal.SIGINT]
    finally:
        signals.close()
