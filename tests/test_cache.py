"""The three cache levels on real files: hits, misses, staleness, corruption, races."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_factory import one_pass, write_official
from safetensors import safe_open

from sensevoice_core import Settings, load_model, load_sensevoice_cached
from sensevoice_core.errors import ModelFileError
from sensevoice_core.snapshot import read_header, verify_data
from sensevoice_core.snapshot_trust import boot_id

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "tests" / "data" / "en.mp3"


@pytest.fixture
def model_dir(official_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(official_dir, tmp_path / "model"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The cache of a float32 model; tests/test_compute.py covers the other compute types.
    return Settings(compute_type="float32", cache_dir=tmp_path / "cache")


def snapshots(settings: Settings) -> list[Path]:
    return sorted((settings.cache_dir / "snapshots").glob("*.safetensors"))


def test_fresh_load_writes_l2_and_l3_then_l2_is_used(model_dir, settings):
    fresh, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "fresh" and report.snapshot is not None
    assert [report.snapshot] == snapshots(settings)
    l3 = json.loads((settings.cache_dir / "model_path.json").read_text(encoding="utf-8"))
    entry = l3["entries"][str(model_dir.resolve())]
    assert entry["fingerprint"] == report.fingerprint and entry["layout"] == "official"
    assert set(entry["files"]) == {"weights", "config", "tokenizer", "cmvn"}
    assert l3["last_model_dir"] == str(model_dir.resolve())

    cached, second = load_sensevoice_cached(model_dir, settings=settings)
    assert second.level == "L2" and second.fingerprint == report.fingerprint
    assert second.bytes_read == 0  # nothing changed: L3 validated by stat alone, no hashing
    assert set(second.steps_s) >= {"resolve", "l3", "l2"}
    assert one_pass(cached, CLIP) == one_pass(fresh, CLIP)
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, cached.model.state_dict()[key]), key


def test_l2_tensors_are_views_of_one_mapped_file(model_dir, settings):
    load_sensevoice_cached(model_dir, settings=settings)
    model, report = load_sensevoice_cached(model_dir, settings=settings)
    storages = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
    assert len(storages) == 1  # every parameter lives in the snapshot's single mapping
    with safe_open(str(report.snapshot), framework="pt") as handle:  # a valid safetensors file
        assert torch.equal(handle.get_tensor("embed.weight"), model.model.embed.weight)


def test_load_model_is_load_sensevoice_cached_without_the_report(model_dir, settings):
    """The front door goes through the cache: its first load writes L2, the next is an L2 hit."""
    model = load_model(model_dir, settings=settings)
    [snapshot] = snapshots(settings)
    again, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "L2" and report.snapshot == snapshot and report.bytes_read == 0
    assert one_pass(again, CLIP) == one_pass(model, CLIP)
    on_l2 = load_model(model_dir, settings=settings)
    assert len({p.untyped_storage().data_ptr() for p in on_l2.model.parameters()}) == 1
    assert snapshots(settings) == [snapshot]


@pytest.mark.parametrize("change", ["weights", "config", "tokenizer", "cmvn"])
def test_a_changed_file_gives_a_new_fingerprint_and_a_rebuild(model_dir, settings, change,
                                                               tmp_path):
    _, before = load_sensevoice_cached(model_dir, settings=settings)
    other = write_official(tmp_path / "other", seed=7)
    if change == "weights":
        shutil.copyfile(other / "model.pt", model_dir / "model.pt")
    elif change == "config":
        with open(model_dir / "config.yaml", "a", encoding="utf-8") as handle:
            handle.write("\n# edited\n")
    elif change == "tokenizer":
        path = model_dir / "chn_jpn_yue_eng_ko_spectok.bpe.model"
        from sensevoice_core.random_model import SMALL_NORMAL_PIECES
        from sensevoice_core.tokenizer import all_tag_pieces, build_sentencepiece_model
        pieces = list(reversed(SMALL_NORMAL_PIECES))  # same size, other ids
        path.write_bytes(build_sentencepiece_model(pieces, all_tag_pieces()))
    else:
        text = (model_dir / "am.mvn").read_text(encoding="utf-8")
        (model_dir / "am.mvn").write_text(text.replace("-8.311879", "-8.3"), encoding="utf-8")
    _, after = load_sensevoice_cached(model_dir, settings=settings)
    assert after.level == "fresh" and after.fingerprint != before.fingerprint
    assert after.bytes_read > 0


def test_a_touched_but_identical_file_is_rehashed_and_l2_still_used(model_dir, settings):
    _, before = load_sensevoice_cached(model_dir, settings=settings)
    stat = (model_dir / "model.pt").stat()
    os.utime(model_dir / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, after = load_sensevoice_cached(model_dir, settings=settings)
    assert after.level == "L2" and after.fingerprint == before.fingerprint
    # On an L3 miss every file is hashed (beside the speculative load), none taken from L3.
    assert after.bytes_hashed == sum(Path(p).stat().st_size for p in after.file_paths.values())


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        middle = len(data) * 3 // 4
        data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    elif how == "header":
        data[8:40] = b"{" * 32
    elif how == "frontend":  # one byte of the header's meaning, the data untouched
        marker = b'lfr_n\\": 6'
        assert data.count(marker) == 1
        data[data.index(marker) + len(marker) - 1] = ord("5")
    elif how == "metadata":
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_size])
        header["__metadata__"]["fingerprint"] = "0" * 64
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (header_size - len(encoded))
        assert len(encoded) == header_size
        data[8:8 + header_size] = encoded
    # Damage arrives as a new file (a copy, a crash of another tool): the running process
    # still maps the old one, which an in-place write would change under its feet.
    replacement = path.with_suffix(".damaged")
    replacement.write_bytes(bytes(data))
    os.replace(replacement, path)


@pytest.mark.parametrize("how", ["truncated", "flipped", "header", "frontend", "metadata"])
def test_a_damaged_snapshot_is_discarded_and_rebuilt(model_dir, settings, how, caplog):
    reference, first = load_sensevoice_cached(model_dir, settings=settings)
    corrupt(first.snapshot, how)
    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "fresh"
    assert any("discarded" in message for message in caplog.messages)
    assert one_pass(model, CLIP) == one_pass(reference, CLIP)
    verify_data(report.snapshot)  # rebuilt, whole again
    _, third = load_sensevoice_cached(model_dir, settings=settings)
    assert third.level == "L2"


LOAD_AND_REPORT = (
    "import json, sys\n"
    "from sensevoice_core import Settings, load_sensevoice_cached\n"
    "settings = Settings(compute_type='float32', cache_dir=sys.argv[2])\n"
    "reports = [load_sensevoice_cached(sys.argv[1], settings=settings)[1] for _ in range(2)]\n"
    "print(json.dumps([{'level': r.level, 'bytes_read': r.bytes_read, 'steps': r.steps_s,\n"
    "                   'warnings': r.warnings} for r in reports]))\n"
)


def load_in_new_process(model_dir: Path, cache_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(model_dir),
                           str(cache_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_snapshot_is_hashed_once_per_boot_and_identity_not_on_l3_alone(model_dir, settings):
    """Size and mtime in L3 are no proof: the snapshot's data is hashed once per file identity
    per boot (the process that wrote it records it beside it); another boot's record, a record
    for another identity or checksum, or none at all makes a new process hash it again."""
    _, first = load_sensevoice_cached(model_dir, settings=settings)
    size = first.snapshot.stat().st_size
    record = first.snapshot.with_name(first.snapshot.name + ".verified")
    assert json.loads(record.read_text())["boot_id"] == boot_id()
    new_process, same_process_again = load_in_new_process(model_dir, settings.cache_dir)
    assert new_process["level"] == "L2" and new_process["bytes_read"] == 0
    assert "verify_l2" not in new_process["steps"] and not new_process["warnings"]

    for tamper in ("boot_id", "data_sha256", "identity", "garbage", "missing"):
        content = json.loads(record.read_text()) if record.exists() else {}
        if tamper == "garbage":
            record.write_text("{not json")
        elif tamper == "missing":
            record.unlink()
        elif tamper == "identity":
            content["identity"]["ctime_ns"] += 1
            record.write_text(json.dumps(content))
        else:
            content[tamper] = "0" * 64
            record.write_text(json.dumps(content))
        new_process, same_process_again = load_in_new_process(model_dir, settings.cache_dir)
        assert new_process["level"] == "L2" and new_process["bytes_read"] == size, tamper
        assert "verify_l2" in new_process["steps"] and not new_process["warnings"], tamper
        assert same_process_again["bytes_read"] == 0 and "verify_l2" not in \
            same_process_again["steps"]
        assert json.loads(record.read_text())["boot_id"] == boot_id()  # recorded again


def test_a_snapshot_with_a_new_identity_is_verified_again_in_the_same_process(model_dir,
                                                                              settings):
    _, first = load_sensevoice_cached(model_dir, settings=settings)
    stat = first.snapshot.stat()
    os.utime(first.snapshot, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # e.g. cp -p
    _, second = load_sensevoice_cached(model_dir, settings=settings)
    assert second.level == "L2" and second.bytes_read == stat.st_size  # verified once
    _, third = load_sensevoice_cached(model_dir, settings=settings)
    assert third.level == "L2" and third.bytes_read == 0  # and trusted from then on


def test_a_corrupt_l3_file_is_ignored_with_a_warning_and_rewritten(model_dir, settings, caplog):
    load_sensevoice_cached(model_dir, settings=settings)
    l3 = settings.cache_dir / "model_path.json"
    l3.write_text('{"version": 1, "entries": {"x": ', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        _, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "L2"
    corrupt_lines = [m for m in caplog.messages if "corrupt" in m]
    assert len(corrupt_lines) == 1 and str(l3) in corrupt_lines[0]  # once per load, not 3x
    assert corrupt_lines[0] in report.warnings  # and in the report the service shows
    assert "Traceback" not in corrupt_lines[0] and "{" not in corrupt_lines[0]
    assert json.loads(l3.read_text(encoding="utf-8"))["entries"]


def test_missing_model_files_are_named(model_dir, settings):
    (model_dir / "am.mvn").unlink()
    with pytest.raises(ModelFileError, match="am.mvn"):
        load_sensevoice_cached(model_dir, settings=settings)


def test_an_unwritable_cache_degrades_to_a_direct_load(model_dir, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    settings = Settings(cache_dir=blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "fresh" and report.snapshot is None
    assert any("cannot write L2" in m and "SENSEVOICE_DISABLE_CACHE" in m
               for m in caplog.messages)
    assert one_pass(model, CLIP)[0].token_ids


def test_a_full_disk_degrades_to_a_direct_load(model_dir, tmp_path):
    """RLIMIT_FSIZE makes every large write fail with EFBIG, as a full disk would."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from sensevoice_core import Settings, load_sensevoice_cached\n"
        "model, report = load_sensevoice_cached(sys.argv[1], settings=Settings(compute_type='float32', cache_dir=sys.argv[2]))\n"
        "print(report.level, report.snapshot, len(report.warnings), model.transcribe(sys.argv[3]).duration_s)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(model_dir), str(tmp_path / "c"),
                           str(CLIP)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    level, snapshot, warnings, _ = done.stdout.split()
    assert (level, snapshot) == ("fresh", "None") and int(warnings) >= 1
    assert "cannot write L2" in done.stderr
    assert not list((tmp_path / "c" / "snapshots").glob("*.tmp"))  # no partial file left


def test_disable_cache_bypasses_l2(model_dir, tmp_path):
    settings = Settings(cache_dir=tmp_path / "cache", disable_cache=True)
    for _ in range(2):
        _, report = load_sensevoice_cached(model_dir, settings=settings)
        assert report.level == "fresh" and report.snapshot is None
    assert not (settings.cache_dir / "snapshots").exists()


def test_force_fresh_rebuilds(model_dir, settings):
    _, first = load_sensevoice_cached(model_dir, settings=settings)
    written = first.snapshot.stat().st_mtime_ns
    _, second = load_sensevoice_cached(model_dir, settings=settings, force_fresh=True)
    assert second.level == "fresh" and second.snapshot.stat().st_mtime_ns != written


def test_only_the_newest_snapshots_are_kept(tmp_path):
    settings = Settings(cache_dir=tmp_path / "cache", keep_snapshots=2)
    reports = [load_sensevoice_cached(write_official(tmp_path / f"m{seed}", seed=seed),
                                      settings=settings)[1] for seed in range(3)]
    assert snapshots(settings) == sorted(r.snapshot for r in reports[1:])


def test_two_processes_racing_to_build_l2_both_get_a_correct_model(model_dir, settings):
    script = (
        "import sys\n"
        "from sensevoice_core import Settings, TranscribeOptions, load_sensevoice_cached\n"
        "from sensevoice_core.audio import load_audio\n"
        "model, report = load_sensevoice_cached(sys.argv[1], settings=Settings(compute_type='float32', cache_dir=sys.argv[2]))\n"
        "[segment] = model.decode([load_audio(sys.argv[3])], TranscribeOptions())\n"
        "print(report.level, list(segment.token_ids))\n"
    )
    command = [sys.executable, "-c", script, str(model_dir), str(settings.cache_dir), str(CLIP)]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outputs]
    token_ids = {out.split(" ", 1)[1] for out, _ in outputs}
    assert len(token_ids) == 1
    (snapshot,) = snapshots(settings)
    verify_data(snapshot)
    assert read_header(snapshot)[1]["fingerprint"]
    assert not list(snapshot.parent.glob("*.tmp"))
    _, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "L2"
