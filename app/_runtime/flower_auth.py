"""Flower's credentials: Flower shows every request's arguments and results, so it never runs open by default.

Given credentials (`--flower-basic-auth` / `$FLOWER_BASIC_AUTH`, `user:password`) are used as they are;
otherwise a password is generated on the first run and kept, with the user name, in `.serve/flower-credentials`
(0600, in the 0700 run-state folder next to `run.json`), and later runs from that folder reuse it.
`--flower-no-auth` (`start_flower(auth=False)`) turns authentication off: an explicit choice, never a default.
The password is never printed; the banner names the file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from celery_serve._runtime import state
from celery_serve.exceptions import ServeError

CREDENTIALS_FILE = "flower-credentials"
DEFAULT_USER = "admin"


@dataclass(frozen=True)
class FlowerAuth:
    basic_auth: str | None  # user:password (comma-separated for several), None when auth is off
    source: str  # where they came from, for the banner: a file path, "given", or "off"

    @property
    def user(self) -> str | None:
        return self.basic_auth.split(":", 1)[0] if self.basic_auth else None


def credentials_path(cwd: str | None = None) -> Path:
    return Path(cwd or os.getcwd()) / state.LOCAL_DIR / CREDENTIALS_FILE


def resolve(basic_auth: str | None = None, *, auth: bool = True, cwd: str | None = None) -> FlowerAuth:
    """The credentials Flower runs with (see the module docstring for the order)."""
    if not auth:
        return FlowerAuth(None, "off")
    given = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if given:
        if any(":" not in pair or not pair.split(":", 1)[1] for pair in given.split(",")):
            raise ServeError("Flower credentials must be user:password (several separated by commas)")
        return FlowerAuth(given, "given")
    path = credentials_path(cwd)
    try:
        kept = path.read_text().strip()
    except OSError:
        kept = ""
    if ":" in kept and kept.split(":", 1)[1]:
        return FlowerAuth(kept, str(path))
    generated = f"{DEFAULT_USER}:{secrets.token_urlsafe(18)}"
    try:
        state._write_private(path, generated + "\n")
    except OSError as exc:
        raise ServeError(
            f"cannot keep Flower's generated credentials in {path} ({exc.strerror}); give them with "
            "--flower-basic-auth / FLOWER_BASIC_AUTH, or run from a folder you can write to"
        ) from None
    return FlowerAuth(generated, str(path))
