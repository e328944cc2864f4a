"""How a login reaches the user: the authorization URL, or the device flow's user code.

:class:`LoginPrompt` is the interface :func:`dpop_hsm.login.login` talks to; the default,
:class:`TerminalPrompt`, opens the browser (``webbrowser``) unless told not to and prints on
stderr, so the command's result keeps stdout. Tests and GUIs give their own.
"""

from __future__ import annotations

import logging
import sys
import webbrowser
from collections.abc import Callable
from typing import Protocol, TextIO

from .device import DeviceAuthorization

__all__ = ["LoginPrompt", "TerminalPrompt"]

log = logging.getLogger("dpop_hsm.login")


class LoginPrompt(Protocol):
    """How a login reaches the user: the authorization URL, or the device flow's user code."""

    def show_authorization_url(self, url: str) -> None: ...

    def show_device_code(self, authorization: DeviceAuthorization) -> None: ...


class TerminalPrompt:
    """The default prompt: open the browser (unless told not to) and print on ``stream``.

    The authorization URL and ``verification_uri_complete`` are printed alone on a line so a
    user (or a script) can copy them whole; ``stream`` defaults to stderr, keeping stdout for
    the command's result.
    """

    def __init__(
        self,
        *,
        open_browser: bool = True,
        stream: TextIO | None = None,
        opener: Callable[[str], bool] = webbrowser.open,
    ) -> None:
        self.open_browser = open_browser
        self._stream = stream
        self._opener = opener

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def show_authorization_url(self, url: str) -> None:
        opened = False
        if self.open_browser:
            try:
                opened = bool(self._opener(url))
            except Exception as e:  # webbrowser may raise anything a launcher raises
                log.debug("could not open a browser: %s", type(e).__name__)
        intro = (
            "Opened a browser to log in; if it did not appear, open this URL:"
            if opened
            else "Open this URL in a browser to log in:"
        )
        self.stream.write(f"{intro}\n{url}\n")
        self.stream.flush()

    def show_device_code(self, authorization: DeviceAuthorization) -> None:
        self.stream.write(
            f"To log in, open {authorization.verification_uri} and enter the code "
            f"{authorization.user_code}\n"
        )
        if authorization.verification_uri_complete:
            self.stream.write(
                f"or open this URL (the code is filled in):\n"
                f"{authorization.verification_uri_complete}\n"
            )
        self.stream.flush()
