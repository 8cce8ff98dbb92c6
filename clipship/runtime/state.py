"""Process-wide state that library calls borrow and give back.

transformers and datasets log and draw progress bars for every load; torch keeps one global RNG.
A clipship call quiets the libraries and seeds torch for its own work, then leaves all of them
as it found them, so a notebook or a program that calls clipship keeps its own settings.
Figures are drawn with matplotlib's object API (``figure``), which never selects a backend.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars off and its logging silent (its parquet
    reader logs the error it then raises; ours names the task and the file)."""
    import datasets
    from datasets.utils import logging

    level, bars = logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield datasets
    finally:
        logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def borrows_process_state(function: F) -> F:
    """Run ``function`` with transformers quiet and torch's global RNG state (CPU and every
    CUDA device) restored afterwards, whatever it seeds."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with quiet_transformers(), torch.random.fork_rng():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` not registered with pyplot (no backend switch, no global state)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


_HUB_ANSWERED: dict[str, tuple[bool, float]] = {}
_ASK_AGAIN_AFTER = 60.0  # seconds a "no answer" stands before the next call asks again


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub endpoint answers at all. Without a network the Hub clients retry each
    request for about half a minute; one short question first lets a missing network cost
    seconds and one error line. It is asked through ``huggingface_hub``'s own HTTP client (its
    proxies, certificates and any client factory the program set), in a thread given
    ``timeout`` seconds in all (a name lookup included). Any HTTP answer, an error status
    included, means reachable; an answer is kept per endpoint, a "no" for a minute only.
    ``HF_HUB_OFFLINE`` (the clients' own switch) answers no without asking."""
    import time

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT.rstrip("/")
    known = _HUB_ANSWERED.get(endpoint)
    if known and (known[0] or time.monotonic() - known[1] < _ASK_AGAIN_AFTER):
        return known[0]
    answered: list[bool] = []

    def ask() -> None:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(f"{endpoint}/api/whoami-v2", timeout=timeout)
            answered.append(True)
        except Exception:  # the client's connection, timeout, proxy and TLS errors alike
            answered.append(False)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    _HUB_ANSWERED[endpoint] = (bool(answered and answered[0]), time.monotonic())
    return _HUB_ANSWERED[endpoint][0]


def hub_state() -> str:
    """How the Hub stands, for an error line: offline by choice, or not answering."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE is set"
    return f"unreachable: {constants.ENDPOINT.rstrip('/')} did not answer"


_OFFLINE = threading.Lock()
_OFFLINE_OPEN: dict[str, Any] = {"blocks": 0, "found": None}  # the flags the first block found


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """``huggingface_hub`` and ``datasets`` in offline mode (their local caches only) for the
    block, as if ``HF_HUB_OFFLINE=1`` had been set before they were imported. The switch is
    process-wide: blocks may overlap (threads, nesting), and the flags come back as the first
    block found them when the last one ends."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    with _OFFLINE:
        if _OFFLINE_OPEN["blocks"] == 0:
            _OFFLINE_OPEN["found"] = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
        _OFFLINE_OPEN["blocks"] += 1
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        with _OFFLINE:
            _OFFLINE_OPEN["blocks"] -= 1
            if _OFFLINE_OPEN["blocks"] == 0:
                constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = _OFFLINE_OPEN["found"]
