"""Model path search and repair: find_or_fix_model_path and diagnose_model_paths.

Every test runs in a private working directory with HOME pointed into tmp_path and the
ModelScope / Hugging Face cache variables removed, so neither the real cwd, the real home nor
the real hub caches are ever consulted. The model directories are copies of the tiny random
models of conftest.py.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sensevoice_core.model_path import (
    MISSPELLINGS,
    Candidate,
    diagnose_model_paths,
    find_or_fix_model_path,
)

OFFICIAL_FILES = ("model.pt", "config.yaml", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model")
HF_FILES = ("config.json", "model.safetensors", "tokenizer.model", "am.mvn")
HUB_VARIABLES = ("MODELSCOPE_CACHE", "HF_HOME", "HF_HUB_CACHE", "SENSEVOICE_MODEL_DIR")
HF_REPO = "models--FunAudioLLM--SenseVoiceSmall"


@dataclass
class Place:
    root: Path  # tmp_path; HOME points here
    work: Path  # the working directory, empty at first

    def diagnose(self, hint=None, env_model_dir=None, **kwargs) -> list[Candidate]:
        return diagnose_model_paths(hint, env_model_dir, cwd=self.work, home=self.root, **kwargs)


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return Place(tmp_path, work)


@pytest.fixture
def models(official_dir: Path, hf_dir: Path) -> dict[str, Path]:
    return {"official": official_dir, "hf": hf_dir}


def copy_model(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    return target


def same(a: Path | None, b: Path) -> bool:
    return a is not None and Path(a).resolve() == b.resolve()


def by_source(candidates: list[Candidate], source: str) -> Candidate:
    matches = [c for c in candidates if c.source == source]
    assert len(matches) == 1, f"{source}: {candidates}"
    return matches[0]


def accepted(candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c.accepted]


def tree_state(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry under root (root included): is-dir, size and mtime, without following links."""
    state = {}
    for path in [root, *root.rglob("*")]:
        stat = path.lstat()
        state[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return state


# --- hints ------------------------------------------------------------------------------------


HINT_FORMS = {
    "absolute": lambda p: str(p.root / "work" / "sv"),
    "absolute Path": lambda p: p.root / "work" / "sv",
    "trailing slash": lambda p: str(p.root / "work" / "sv") + "/",
    "trailing slashes": lambda p: str(p.root / "work" / "sv") + "///",
    "relative": lambda p: "sv",
    "relative with ./ and slash": lambda p: "./sv/",
    "relative through ..": lambda p: "../work/sv",
    "tilde": lambda p: "~/work/sv",
    "tilde with trailing slash": lambda p: "~/work/sv/",
    "surrounding whitespace": lambda p: f"  {p.root / 'work' / 'sv'}  ",
}


@pytest.mark.parametrize("layout", ["official", "hf"])
@pytest.mark.parametrize("form", list(HINT_FORMS))
def test_hint_forms_resolve_to_the_model_directory(place, models, layout, form):
    model = copy_model(models[layout], place.work / "sv")
    hint = HINT_FORMS[form](place)

    assert same(find_or_fix_model_path(hint), model)
    first = place.diagnose(hint)[0]
    assert first.source == "hint" and first.accepted and first.layout == layout
    assert same(first.path, model) and first.path.is_absolute()
    assert first.reason == f"{layout} layout"


@pytest.mark.parametrize("layout, name", [
    ("official", "model.pt"), ("official", "config.yaml"), ("official", "am.mvn"),
    ("hf", "config.json"), ("hf", "model.safetensors"), ("hf", "tokenizer.model"),
])
def test_hint_to_a_file_inside_the_model_means_its_directory(place, models, layout, name):
    model = copy_model(models[layout], place.work / "sv")

    assert same(find_or_fix_model_path(str(model / name)), model)
    assert same(find_or_fix_model_path(f"sv/{name}"), model)
    assert same(find_or_fix_model_path(f"~/work/sv/{name}"), model)
    first = place.diagnose(model / name)[0]
    assert first.source == "hint" and first.accepted and same(first.path, model)


def test_hint_equal_to_model_folder_is_looked_at_once(place, official_dir):
    model = copy_model(official_dir, place.work / "model")

    candidates = place.diagnose("model")
    assert candidates[0].source == "hint" and same(candidates[0].path, model)
    assert "./model" not in [c.source for c in candidates]
    assert len({c.path for c in candidates}) == len(candidates)


# --- ./model and the folder one level down ----------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_model_folder_holding_the_model_directly(place, models, layout):
    model = copy_model(models[layout], place.work / "model")

    assert same(find_or_fix_model_path(), model)
    candidate = by_source(place.diagnose(), "./model")
    assert candidate.accepted and candidate.layout == layout
    assert candidate.reason == f"{layout} layout"


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_model_one_folder_down(place, models, layout):
    nested = copy_model(models[layout], place.work / "model" / "SenseVoiceSmall")
    (place.work / "model" / "README.md").write_text("the repo's model/ holds a README\n")
    (place.work / "model" / "notes").mkdir()  # a folder that is not a model is ignored

    assert same(find_or_fix_model_path(), nested)
    candidate = by_source(place.diagnose(), "./model")
    assert candidate.accepted and same(candidate.path, nested)
    assert "one folder down" in candidate.reason
    assert candidate.layout == layout


def test_hidden_folders_are_not_counted_as_nested_models(place, official_dir, hf_dir):
    nested = copy_model(official_dir, place.work / "model" / "SenseVoiceSmall")
    copy_model(hf_dir, place.work / "model" / ".backup")

    assert same(find_or_fix_model_path(), nested)


def test_several_nested_models_are_rejected(place, official_dir, hf_dir):
    copy_model(official_dir, place.work / "model" / "SenseVoiceSmall")
    copy_model(hf_dir, place.work / "model" / "converted")

    assert find_or_fix_model_path() is None
    candidate = by_source(place.diagnose(), "./model")
    assert not candidate.accepted
    assert "several" in candidate.reason
    assert "SenseVoiceSmall" in candidate.reason and "converted" in candidate.reason
    assert same(candidate.path, place.work / "model")
    assert accepted(place.diagnose()) == []


def test_several_nested_models_behind_a_hint_give_none(place, official_dir, hf_dir):
    copy_model(official_dir, place.work / "both" / "a")
    copy_model(hf_dir, place.work / "both" / "b")
    copy_model(official_dir, place.work / "model")  # valid, but the hint was explicit

    assert find_or_fix_model_path("both") is None
    first = place.diagnose("both")[0]
    assert first.source == "hint" and not first.accepted and "several" in first.reason


def test_nested_model_two_folders_down_is_not_found(place, official_dir):
    copy_model(official_dir, place.work / "model" / "iic" / "SenseVoiceSmall")

    assert find_or_fix_model_path() is None
    assert not by_source(place.diagnose(), "./model").accepted


# --- misspellings -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MISSPELLINGS)
def test_misspelt_model_folder_is_found_when_model_is_absent(place, official_dir, name):
    model = copy_model(official_dir, place.work / name)

    assert same(find_or_fix_model_path(), model)
    candidate = by_source(place.diagnose(), f"./{name} (misspelling)")
    assert candidate.accepted and same(candidate.path, model)
    assert by_source(place.diagnose(), "./model").reason == "no such directory"


def test_misspelling_with_the_model_one_folder_down(place, hf_dir):
    nested = copy_model(hf_dir, place.work / "models" / "SenseVoiceSmall")

    assert same(find_or_fix_model_path(), nested)
    assert "one folder down" in by_source(place.diagnose(), "./models (misspelling)").reason


def test_misspelling_is_used_when_model_folder_is_empty(place, official_dir):
    (place.work / "model").mkdir()
    model = copy_model(official_dir, place.work / "models")

    assert same(find_or_fix_model_path(), model)
    rejected = by_source(place.diagnose(), "./model")
    assert not rejected.accepted and "not a SenseVoice model directory" in rejected.reason


def test_model_folder_wins_over_misspellings(place, official_dir, hf_dir):
    model = copy_model(official_dir, place.work / "model")
    copy_model(hf_dir, place.work / "models")

    assert same(find_or_fix_model_path(), model)


# --- SENSEVOICE_MODEL_DIR and explicit configuration ------------------------------------------


def test_env_model_dir_is_used_without_a_hint(place, official_dir, hf_dir):
    model = copy_model(hf_dir, place.root / "elsewhere" / "sv")
    copy_model(official_dir, place.work / "model")  # would be found without the variable

    assert same(find_or_fix_model_path(None, str(model)), model)
    assert same(find_or_fix_model_path(None, model), model)
    first = place.diagnose(None, model)[0]
    assert first.source == "SENSEVOICE_MODEL_DIR" and first.accepted


def test_env_model_dir_relative_and_with_tilde(place, official_dir):
    model = copy_model(official_dir, place.work / "sv")

    assert same(find_or_fix_model_path(None, "sv/"), model)
    assert same(find_or_fix_model_path(None, "~/work/sv"), model)


def test_hint_wins_over_env_model_dir(place, official_dir, hf_dir):
    hinted = copy_model(official_dir, place.work / "hinted")
    from_env = copy_model(hf_dir, place.work / "from_env")

    assert same(find_or_fix_model_path(hinted, from_env), hinted)
    assert same(find_or_fix_model_path(hinted, place.work / "no-such-dir"), hinted)


def test_blank_hint_and_env_are_ignored(place, official_dir):
    model = copy_model(official_dir, place.work / "model")

    assert same(find_or_fix_model_path("", "   "), model)
    sources = [c.source for c in place.diagnose("  ", "")]
    assert "hint" not in sources and "SENSEVOICE_MODEL_DIR" not in sources


@pytest.mark.parametrize("what", ["missing directory", "empty directory", "incomplete model"])
@pytest.mark.parametrize("given_as", ["hint", "SENSEVOICE_MODEL_DIR"])
def test_explicit_location_that_is_not_a_model_is_never_replaced(place, official_dir,
                                                                  what, given_as):
    valid = copy_model(official_dir, place.work / "model")
    explicit = place.root / "configured"
    if what == "empty directory":
        explicit.mkdir()
    elif what == "incomplete model":
        copy_model(official_dir, explicit)
        (explicit / "am.mvn").unlink()
    args = (explicit, None) if given_as == "hint" else (None, explicit)

    assert find_or_fix_model_path(*args) is None

    candidates = place.diagnose(*args)
    first = candidates[0]
    assert first.source == given_as and not first.accepted and same(first.path, explicit)
    expected_reason = {"missing directory": "no such directory",
                       "empty directory": "not a SenseVoice model directory",
                       "incomplete model": "missing am.mvn"}[what]
    assert expected_reason in first.reason
    # The valid ./model is still listed, so the diagnosis shows what was passed over.
    model_candidate = by_source(candidates, "./model")
    assert model_candidate.accepted and same(model_candidate.path, valid)


def test_invalid_env_with_a_valid_hint_is_not_a_problem(place, official_dir):
    hinted = copy_model(official_dir, place.work / "hinted")

    assert same(find_or_fix_model_path("hinted", "no-such-dir"), hinted)


# --- hub caches -------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["hub/iic/SenseVoiceSmall", "hub/models/iic/SenseVoiceSmall"])
def test_modelscope_cache_from_variable(place, official_dir, monkeypatch, sub):
    model = copy_model(official_dir, place.root / "ms" / sub)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(place.root / "ms"))

    assert same(find_or_fix_model_path(), model)
    found = accepted(place.diagnose())
    assert [c.source for c in found] == ["ModelScope cache"] and same(found[0].path, model)


def test_modelscope_cache_default_location_under_home(place, official_dir):
    model = copy_model(official_dir,
                       place.root / ".cache" / "modelscope" / "hub" / "iic" / "SenseVoiceSmall")

    assert same(find_or_fix_model_path(), model)  # HOME is place.root
    assert same(accepted(place.diagnose())[0].path, model)


def write_hf_snapshot(hub: Path, model: Path, revision: str) -> Path:
    """The hub cache's own layout: files in blobs/, the snapshot folder holds symlinks."""
    repo = hub / HF_REPO
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in model.iterdir():
        blob = repo / "blobs" / f"{revision}-{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hugging_face_cache_from_hf_hub_cache(place, hf_dir, monkeypatch):
    snapshot = write_hf_snapshot(place.root / "hf", hf_dir, "0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(place.root / "hf"))

    assert same(find_or_fix_model_path(), snapshot)
    found = accepted(place.diagnose())
    assert [c.source for c in found] == ["Hugging Face cache"] and same(found[0].path, snapshot)
    assert found[0].layout == "hf"


def test_hugging_face_cache_with_plain_files(place, hf_dir, monkeypatch):
    snapshot = copy_model(hf_dir, place.root / "hf" / HF_REPO / "snapshots" / "any-hash")
    monkeypatch.setenv("HF_HUB_CACHE", str(place.root / "hf"))

    assert same(find_or_fix_model_path(), snapshot)


def test_hugging_face_cache_from_hf_home_and_default(place, hf_dir, monkeypatch):
    snapshot = write_hf_snapshot(place.root / "hfhome" / "hub", hf_dir, "cafe")
    monkeypatch.setenv("HF_HOME", str(place.root / "hfhome"))
    assert same(find_or_fix_model_path(), snapshot)

    monkeypatch.delenv("HF_HOME")
    default = write_hf_snapshot(place.root / ".cache" / "huggingface" / "hub", hf_dir, "beef")
    assert same(find_or_fix_model_path(), default)


def test_newest_hugging_face_snapshot_first(place, hf_dir, monkeypatch):
    hub = place.root / "hf"
    old = write_hf_snapshot(hub, hf_dir, "old")
    new = write_hf_snapshot(hub, hf_dir, "new")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    os.utime(new, (2_000_000_000, 2_000_000_000))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    assert same(find_or_fix_model_path(), new)
    found = [c for c in place.diagnose() if c.source == "Hugging Face cache"]
    assert [c.path.name for c in found] == ["new", "old"]


# --- every missing file is named --------------------------------------------------------------


MISSING_CASES = [("official", name) for name in OFFICIAL_FILES] + [
    ("hf", name) for name in HF_FILES]


@pytest.mark.parametrize("layout, name", MISSING_CASES)
def test_missing_file_is_named_in_the_reason(place, models, layout, name):
    model = copy_model(models[layout], place.work / "model")
    (model / name).unlink()

    assert find_or_fix_model_path() is None
    candidate = by_source(place.diagnose(), "./model")
    assert not candidate.accepted and same(candidate.path, model)
    assert f"missing {name}" in candidate.reason, candidate.reason
    # Other required files are not blamed.
    others = [other for other in (OFFICIAL_FILES if layout == "official" else HF_FILES)
              if other != name]
    assert not any(f"missing {other}" in candidate.reason for other in others)


@pytest.mark.parametrize("layout, name", MISSING_CASES)
def test_missing_file_behind_a_hint_is_named(place, models, layout, name):
    model = copy_model(models[layout], place.root / "sv")
    (model / name).unlink()

    assert find_or_fix_model_path(model) is None
    first = place.diagnose(model)[0]
    assert first.source == "hint" and not first.accepted
    assert f"missing {name}" in first.reason


@pytest.mark.parametrize("layout, name", MISSING_CASES)
def test_missing_file_one_folder_down_is_not_accepted(place, models, layout, name):
    model = copy_model(models[layout], place.work / "model" / "SenseVoiceSmall")
    (model / name).unlink()

    assert find_or_fix_model_path() is None
    assert not by_source(place.diagnose(), "./model").accepted


# --- nothing is written or moved --------------------------------------------------------------


def test_search_writes_and_moves_nothing(place, official_dir, hf_dir, monkeypatch):
    copy_model(official_dir, place.work / "model" / "SenseVoiceSmall")
    copy_model(hf_dir, place.work / "models" / "a")
    copy_model(official_dir, place.work / "models" / "b")
    incomplete = copy_model(official_dir, place.work / "Model")
    (incomplete / "config.yaml").unlink()
    copy_model(official_dir, place.root / "ms" / "hub" / "iic" / "SenseVoiceSmall")
    write_hf_snapshot(place.root / "hf", hf_dir, "abc")
    (place.work / "empty").mkdir()
    monkeypatch.setenv("MODELSCOPE_CACHE", str(place.root / "ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(place.root / "hf"))
    before = tree_state(place.root)

    for hint, env in [(None, None), ("model", None), ("model/SenseVoiceSmall/model.pt", None),
                      ("~/work/models/", None), ("Model", None), (None, "empty"),
                      ("empty", "models"), (None, "no-such-dir")]:
        find_or_fix_model_path(hint, env)
        place.diagnose(hint, env)

    assert tree_state(place.root) == before


# --- search order -----------------------------------------------------------------------------


def test_search_order(place, official_dir, hf_dir, monkeypatch):
    hinted = copy_model(official_dir, place.work / "hinted")
    from_env = copy_model(hf_dir, place.work / "from_env")
    model = copy_model(official_dir, place.work / "model")
    misspelt = copy_model(hf_dir, place.work / "models")
    modelscope = copy_model(official_dir, place.root / "ms" / "hub" / "iic" / "SenseVoiceSmall")
    hugging_face = write_hf_snapshot(place.root / "hf", hf_dir, "abc")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(place.root / "ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(place.root / "hf"))

    candidates = place.diagnose("hinted", "from_env")
    sources = [c.source for c in candidates]
    assert sources == (["hint", "SENSEVOICE_MODEL_DIR", "./model"]
                       + [f"./{name} (misspelling)" for name in MISSPELLINGS]
                       + ["ModelScope cache", "ModelScope cache", "Hugging Face cache"])
    assert [c.source for c in accepted(candidates)] == [
        "hint", "SENSEVOICE_MODEL_DIR", "./model", "./models (misspelling)",
        "ModelScope cache", "Hugging Face cache"]
    assert all(c.path.is_absolute() for c in candidates)

    short = place.diagnose("hinted", "from_env", stop_at_first=True)
    assert [c.source for c in short] == ["hint"]

    # The first accepted place wins; remove it and the next one in order takes over.
    assert same(find_or_fix_model_path("hinted", "from_env"), hinted)
    assert same(find_or_fix_model_path(None, "from_env"), from_env)
    steps = [(model, model), (misspelt, misspelt), (modelscope, modelscope),
             (hugging_face, hugging_face)]
    for expected, remove in steps:
        assert same(find_or_fix_model_path(), expected)
        shutil.rmtree(remove)
    assert find_or_fix_model_path() is None


# --- regressions: each of these once failed ---------------------------------------------------


def test_dangling_entry_in_hugging_face_snapshots_does_not_break_a_valid_hint(
        place, official_dir, monkeypatch):
    model = copy_model(official_dir, place.work / "sv")
    snapshots = place.root / "hf" / HF_REPO / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "broken").symlink_to(place.root / "no-such-blob-dir")
    monkeypatch.setenv("HF_HUB_CACHE", str(place.root / "hf"))

    assert same(find_or_fix_model_path(model), model)


def test_hint_to_an_unrelated_file_is_not_replaced_by_model_folder(place, official_dir):
    copy_model(official_dir, place.work / "model")
    (place.work / "audio.wav").write_bytes(b"RIFF")

    assert find_or_fix_model_path("audio.wav") is None
