"""Process-wide state that library calls borrow and give back.

transformers and datasets log and draw progress bars for every load; torch keeps one global RNG.
A clipship call quiets the libraries and seeds torch for its own work, then leaves all of them
as it found them, so a notebook or a program that calls clipship keeps its own settings.
Figures are drawn with matplotlib's object API (``figure``), which never selects a backend.
"""

from __future__ import annotations

import contextlib
import functools
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


_HUB_ANSWERED: dict[str, bool] = {}


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub endpoint answers at all, asked once per process and endpoint. Without a
    network the Hub clients retry each request for about half a minute; asking once, with a
    short timeout, lets a missing network cost seconds and one error line. ``HF_HUB_OFFLINE``
    (the clients' own switch) answers no without asking. Any HTTP answer, an error status
    included, means reachable; proxies are honoured as by the clients (the environment's)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT.rstrip("/")
    if endpoint not in _HUB_ANSWERED:
        request = urllib.request.Request(f"{endpoint}/api/whoami-v2", method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            _HUB_ANSWERED[endpoint] = True
        except urllib.error.HTTPError:
            _HUB_ANSWERED[endpoint] = True
        except (OSError, ValueError):  # no route, no name, refused, timed out, a bad URL
            _HUB_ANSWERED[endpoint] = False
    return _HUB_ANSWERED[endpoint]


def hub_state() -> str:
    """How the Hub stands, for an error line: offline by choice, or not answering."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE is set"
    return f"unreachable: {constants.ENDPOINT.rstrip('/')} did not answer"


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """``huggingface_hub`` and ``datasets`` in offline mode (their local caches only) for the
    block, as if ``HF_HUB_OFFLINE=1`` had been set before they were imported."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
