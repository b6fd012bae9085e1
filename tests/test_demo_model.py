"""The shipped demo model (model/) really transcribes its domain, on held-out speech.

The evaluation set (tests/data/demo_eval) was synthesised with voice variants and a speaking
rate that training never used; see model/README.md for what the model is and is not.
"""

import json
from pathlib import Path

import pytest

from sensevoice_core import load_model
from sensevoice_core.audio import load_audio
from training.evaluate import measure

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT / "tests" / "data" / "demo_eval"


@pytest.fixture(scope="module")
def figures(demo_model) -> dict:
    refs = json.loads((EVAL_DIR / "refs.json").read_text(encoding="utf-8"))
    return measure(demo_model, [load_audio(EVAL_DIR / r["file"]) for r in refs],
                   [r["language"] for r in refs], [r["kind"] for r in refs],
                   [r["woitn"] for r in refs])


def test_the_evaluation_set_is_small_and_balanced():
    refs = json.loads((EVAL_DIR / "refs.json").read_text(encoding="utf-8"))
    assert 40 <= len(refs) <= 60
    assert {r["language"] for r in refs} == {"en", "zh"}
    assert sum(p.stat().st_size for p in EVAL_DIR.iterdir()) <= 3 * 2**20


@pytest.mark.parametrize("language", ["en", "zh"])
def test_character_error_rate_is_at_most_ten_percent(figures, language):
    assert figures[f"cer_{language}"] <= 0.10


@pytest.mark.parametrize("language", ["en", "zh"])
def test_language_is_identified_with_auto(figures, language):
    assert figures[f"lid_{language}"] >= 0.95


def test_itn_switch_gives_numerals_or_words(figures):
    assert figures["itn_switch"] >= 0.90


def test_shipped_files_are_small_and_load_as_the_hf_layout():
    files = {p.name for p in (ROOT / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "am.mvn"} <= files
    weights = sum((ROOT / "model" / name).stat().st_size
                  for name in ("config.json", "model.safetensors", "tokenizer.model", "am.mvn"))
    assert weights <= 25 * 10**6
    assert load_model(ROOT / "model").layout == "hf"
