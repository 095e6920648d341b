"""Code by value, for applications defined where workers cannot import them from: `python -c`, a REPL, a
Jupyter kernel (deployments in a `__main__` that has no file).

The application graph (its classes and functions, their bind arguments) is pickled with cloudpickle, which
takes what `__main__` defined by value and importable modules by reference, and travels inside the
application's spec, in Redis' control state, never on a request queue: requests stay JSON. Whoever can write
the spec can already tell workers which module to import, so this grants nothing new; it is used only when
there is no module to import.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from typing import Any

from celery_serve.exceptions import DeploymentConfigError

KEY = "by_value"

_cache: dict[str, Any] = {}


def main_has_no_file() -> bool:
    """True in `python -c`, a REPL or a notebook kernel: `__main__` cannot be imported by a worker."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    return not file or file.startswith("<")


def needs_by_value(targets: list[Any]) -> bool:
    """Does any of these classes or functions live where a worker cannot import it from?"""
    return main_has_no_file() and any(getattr(t, "__module__", None) == "__main__" for t in targets)


def pack(root: Any) -> dict[str, Any]:
    """The application as a spec source: {"by_value": base64 of its cloudpickle, "sha256": ...}."""
    import cloudpickle

    try:
        data = cloudpickle.dumps(root)
    except DeploymentConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever could not be pickled, said plainly
        raise DeploymentConfigError(
            f"this application is defined in {_where()}, so its code travels to the workers by value, but part "
            f"of it cannot be pickled ({type(exc).__name__}: {exc}). Create such objects (locks, open files, "
            "connections, models) in the deployment's __init__ instead of passing them to bind(), or move the "
            "deployments into a module file and run it with `celery-serve run module:app`"
        ) from None
    return {KEY: base64.b64encode(data).decode(), "sha256": hashlib.sha256(data).hexdigest(), "module": "__main__"}


def unpack(source: dict[str, Any]) -> Any:
    """The application a spec carries by value (unpickled once per process and version)."""
    import cloudpickle

    digest = source.get("sha256", "")
    found = _cache.get(digest)
    if found is None:
        try:
            found = cloudpickle.loads(base64.b64decode(source[KEY]))
        except Exception as exc:  # noqa: BLE001 - e.g. a module the caller had that this worker lacks
            raise DeploymentConfigError(
                f"the application's code, sent by value from a notebook or `python -c`, cannot be loaded in "
                f"this worker ({type(exc).__name__}: {exc}); install the same packages (and Python "
                f"{sys.version_info.major}.{sys.version_info.minor}) where the workers run"
            ) from None
        _cache[digest] = found
    return found


def _where() -> str:
    return "a notebook, a REPL or `python -c`"
