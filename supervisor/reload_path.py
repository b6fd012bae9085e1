"""What a reload request asks for, checked before anything starts: the directory to load
(check_reload_path)."""

from __future__ import annotations

from pathlib import Path

from sensevoice_core.protocol import ModelInfo


class ReloadRefused(ValueError):
    """A reload request that is not attempted at all (bad path); the old model keeps serving."""


def resolved_or_none(path: Path) -> str | None:
    try:
        return str(path.expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return None


def check_reload_path(path: str | None, served: ModelInfo | None, roots: list[Path],
                      configured: Path | None = None,
                      follow_configured: bool = False) -> str | None:
    """The absolute directory to load, or None for the default; ReloadRefused when not allowed.

    No path: the served directory, except while the service serves SENSEVOICE_MODEL_DIR
    (follow_configured): then whatever that path resolves to now, so that a deploy that flips
    a symbolic link is followed. Allowed roots for a path: SENSEVOICE_MODEL_ROOTS, or by
    default the parent of the served model directory (before any serves: of
    SENSEVOICE_MODEL_DIR; with neither, no path is allowed).
    """
    if path is None and served is not None and follow_configured and configured is not None:
        target = resolved_or_none(configured)
        if target is None or not Path(target).is_dir():
            raise ReloadRefused(f"SENSEVOICE_MODEL_DIR {configured} "
                                f"{'now resolves to ' + target + ', ' if target else ''}"
                                f"is not a directory; fix the setting or its symbolic link, "
                                f"or name the directory to load")
        return target
    if path is None:
        return served.model_dir if served else None
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            raise ReloadRefused(f"reload path {path!r} is relative; send an absolute path")
        resolved = candidate.resolve()
        allowed = [root.expanduser().resolve() for root in roots]
        if not allowed and served is not None:
            allowed = [Path(served.model_dir).parent]
        elif not allowed and configured is not None:
            allowed = [configured.expanduser().resolve().parent]
        elif not allowed:
            raise ReloadRefused(f"reload path {resolved}: no model is serving yet to take the "
                                f"allowed roots from; set SENSEVOICE_MODEL_ROOTS")
        if not any(resolved.is_relative_to(root) for root in allowed):
            listed = ", ".join(str(root) for root in allowed)
            raise ReloadRefused(f"reload path {resolved} is outside the allowed model roots "
                                f"({listed}); add its parent to SENSEVOICE_MODEL_ROOTS")
        if not resolved.is_dir():
            raise ReloadRefused(f"reload path {resolved} is not a directory")
    except ReloadRefused:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # too long, NUL byte, ~nosuchuser, EACCES
        raise ReloadRefused(f"reload path {path[:200]!r} is not usable: {e}") from None
    return str(resolved)
