"""Find the model directory, and say why every place looked at was accepted or rejected.

"Repair" only resolves paths: ``~``, relative paths, trailing slashes, a file given instead of
its directory, a model one folder further down (``model/SenseVoiceSmall/``), a misspelt folder
(``models/``) and the ModelScope / Hugging Face caches. Nothing is moved, written or downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sensevoice_core.errors import ModelFileError
from sensevoice_core.layout import MODEL_FILE_NAMES, OFFICIAL_CONFIGURATION, model_files

MISSPELLINGS = ("models", "Model", "Models", "model_dir", "sensevoice_model")


@dataclass(frozen=True)
class Candidate:
    source: str  # where the candidate came from: "hint", "SENSEVOICE_MODEL_DIR", "./model", ...
    path: Path  # the directory looked at, absolute
    accepted: bool
    reason: str  # why accepted ("official layout") or rejected (the missing file, ...)
    layout: str | None = None


def _check(source: str, path: Path) -> Candidate:
    """Accept path if it is a model directory, or holds exactly one model directory."""
    try:
        files = model_files(path)
        return Candidate(source, path, True, f"{files.layout} layout", files.layout)
    except ModelFileError as direct_error:
        if not path.is_dir():
            reason = "a file, not a directory" if path.is_file() else "no such directory"
            return Candidate(source, path, False, reason)
        try:
            nested = [child for child in sorted(path.iterdir())
                      if child.is_dir() and not child.name.startswith(".")]
        except OSError as e:
            return Candidate(source, path, False, f"cannot list it ({e.strerror})")
        found = []
        for child in nested:
            try:
                found.append((child, model_files(child)))
            except ModelFileError:
                continue
        if len(found) == 1:
            child, files = found[0]
            return Candidate(source, child, True, f"{files.layout} layout, one folder down",
                             files.layout)
        if len(found) > 1:
            names = ", ".join(child.name for child, _ in found)
            return Candidate(source, path, False,
                             f"holds several model directories ({names}); name one")
        return Candidate(source, path, False, _reason(direct_error))


def _reason(error: ModelFileError) -> str:
    if error.path.name and error.problem.startswith("missing"):
        return f"missing {error.path.name} ({error.problem})"
    return error.problem + (f": found {error.found}" if error.found else "")


def _resolve(raw: str | Path, base: Path, home: Path) -> Path:
    text = str(raw).strip()
    if text == "~" or text.startswith("~/"):
        text = str(home) + text[1:]
    path = Path(text)
    path = path if path.is_absolute() else base / path
    # A model file given instead of its directory (model/model.pt); any other file stays a
    # file, and is rejected, so an explicit path is never swapped for its surroundings.
    if (path.name in MODEL_FILE_NAMES or path.name == OFFICIAL_CONFIGURATION) and path.is_file():
        path = path.parent
    return Path(os.path.normpath(path))


def _newest_first(directory: Path) -> list[Path]:
    """Entries by mtime, newest first; unreadable or dangling entries are skipped."""
    dated = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            dated.append((entry.stat().st_mtime, entry))
        except OSError:
            continue
    return [entry for _, entry in sorted(dated, reverse=True)]


def _hub_caches(home: Path) -> list[tuple[str, Path]]:
    """ModelScope and Hugging Face cache locations where SenseVoiceSmall may already sit."""
    places: list[tuple[str, Path]] = []
    modelscope = Path(os.environ.get("MODELSCOPE_CACHE", home / ".cache" / "modelscope"))
    for sub in ("hub/iic/SenseVoiceSmall", "hub/models/iic/SenseVoiceSmall"):
        places.append(("ModelScope cache", modelscope / sub))
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    hf_hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    snapshots = hf_hub / "models--FunAudioLLM--SenseVoiceSmall" / "snapshots"
    newest_first = _newest_first(snapshots) if snapshots.is_dir() else []
    places += [("Hugging Face cache", snapshot) for snapshot in newest_first or [snapshots]]
    return places


def diagnose_model_paths(
    hint: str | Path | None = None,
    env_model_dir: str | Path | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
    stop_at_first: bool = False,
) -> list[Candidate]:
    """Every candidate in search order with its verdict. The first accepted one wins."""
    base = (cwd or Path.cwd()).resolve()
    home = home or Path.home()
    places: list[tuple[str, Path]] = []
    if hint is not None and str(hint).strip():
        places.append(("hint", _resolve(hint, base, home)))
    if env_model_dir is not None and str(env_model_dir).strip():
        places.append(("SENSEVOICE_MODEL_DIR", _resolve(env_model_dir, base, home)))
    places.append(("./model", base / "model"))
    places += [(f"./{name} (misspelling)", base / name) for name in MISSPELLINGS]
    places += _hub_caches(home)

    candidates: list[Candidate] = []
    seen: set[Path] = set()
    for source, path in places:
        if path in seen:
            continue
        seen.add(path)
        candidate = _check(source, path)
        candidates.append(candidate)
        if candidate.accepted and stop_at_first:
            break
    return candidates


def find_or_fix_model_path(
    hint: str | Path | None = None, env_model_dir: str | Path | None = None
) -> Path | None:
    """The model directory to load, or None when no candidate holds a complete model.

    An explicit hint that is not a model is not silently replaced by another place: the
    result is None, and diagnose_model_paths says why.
    """
    candidates = diagnose_model_paths(hint, env_model_dir, stop_at_first=True)
    first = candidates[0]
    if first.source in ("hint", "SENSEVOICE_MODEL_DIR") and not first.accepted:
        return None
    accepted = [c for c in candidates if c.accepted]
    return accepted[0].path if accepted else None
