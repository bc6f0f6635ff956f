"""``reward_timeout``: a reward call that overruns is interrupted, and the run stops as for one that raises.

A reward function runs in the caller's thread (TRL's contract: some use ``signal.alarm`` themselves,
math-verify does, which works only in the main thread). A watchdog thread waits ``reward_timeout``
seconds; if the call is still running it sends ``TIMEOUT_SIGNAL`` (a real-time signal nothing else
uses, unlike SIGALRM or SIGUSR1) to the main thread, whose handler raises ``Overran`` inside the
function. ``Overran`` is a BaseException, so a function's own ``except Exception`` cannot swallow it.
A blocking system call is interrupted by the signal; C code that never returns to Python (and
retries on EINTR) is not: the limit is Python's. Off the main thread the timeout cannot be enforced
this way and is not (one warning); ``async def`` functions get ``asyncio.wait_for`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

logger = logging.getLogger(__name__)

# A real-time signal where there are (Linux); SIGUSR2 elsewhere (macOS has no real-time signals).
TIMEOUT_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2


class Overran(BaseException):
    """Raised inside a reward function that ran past ``reward_timeout``."""


_armed = {"call": None, "fired": None}  # the call running now (the main thread's, one at a time), the one timed out
_lock = threading.Lock()
_installed = False
_warned = False


def _interrupt(signum, frame):
    if _armed["call"] is not None and _armed["fired"] is _armed["call"]:  # late signals of earlier calls: ignored
        raise Overran


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Interrupt the body with ``Overran`` after ``seconds`` (None: no limit)."""
    global _installed, _warned
    if seconds is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        if not _warned:
            logger.warning("reward_timeout is enforced only when rloo runs in the main thread; reward functions "
                           "called from this thread have no time limit")
            _warned = True
        yield
        return
    if not _installed:  # once: the handler stays, and ignores signals when no call is armed
        signal.signal(TIMEOUT_SIGNAL, _interrupt)
        _installed = True
    token = object()
    main = threading.main_thread().ident

    def fire():
        with _lock:  # only the watchdog threads take it: the main thread never waits here
            if _armed["call"] is token:
                _armed["fired"] = token
                signal.pthread_kill(main, TIMEOUT_SIGNAL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    _armed["call"] = token
    timer.start()
    try:
        yield
    finally:
        _armed["call"] = None  # first: a signal handled after this is ignored
        timer.cancel()
