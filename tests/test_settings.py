"""SENSEVOICE_* environment variables become typed settings, with clear errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from sensevoice_core import Settings


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSEVOICE_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("SENSEVOICE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SENSEVOICE_DISABLE_CACHE", "true")
    monkeypatch.setenv("SENSEVOICE_KEEP_SNAPSHOTS", "5")
    settings = Settings()
    assert settings.model_dir == tmp_path / "m" and settings.cache_dir == tmp_path / "c"
    assert settings.disable_cache is True and settings.keep_snapshots == 5


def test_an_empty_model_dir_means_unset(monkeypatch):
    monkeypatch.setenv("SENSEVOICE_MODEL_DIR", "  ")
    assert Settings().model_dir is None


def test_defaults_are_safe(monkeypatch):
    for name in ("SENSEVOICE_CACHE_DIR", "SENSEVOICE_MODEL_DIR", "SENSEVOICE_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.cache_dir == Path("cache") and settings.device == "cpu"
    assert settings.disable_cache is False and settings.model_dir is None


@pytest.mark.parametrize("name, value", [("SENSEVOICE_KEEP_SNAPSHOTS", "0"),
                                         ("SENSEVOICE_DISABLE_CACHE", "maybe"),
                                         ("SENSEVOICE_THREADS", "-1")])
def test_bad_values_name_the_field(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    field = name.removeprefix("SENSEVOICE_").lower()
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_service_settings_have_the_seed_names_and_safe_defaults(monkeypatch):
    for name in ("SENSEVOICE_HOTRELOAD_TIMEOUT", "SENSEVOICE_ENABLE_FILE_WATCH",
                 "SENSEVOICE_VAD_THRESHOLD", "SENSEVOICE_SUPERVISOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.hotreload_timeout == 30.0 and settings.enable_file_watch is False
    assert settings.vad_threshold == 0.35 and settings.swap_strategy == "blue_green"
    assert settings.warm_standby is True and settings.workers == 1
    assert settings.client_address().startswith("ipc://")


def test_model_roots_are_comma_separated(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSEVOICE_MODEL_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    assert Settings().model_roots == [tmp_path / "a", tmp_path / "b"]


def test_dotenv_file_in_the_working_directory_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SENSEVOICE_HOTRELOAD_TIMEOUT", raising=False)
    (tmp_path / ".env").write_text("SENSEVOICE_HOTRELOAD_TIMEOUT=12.5\n")
    assert Settings().hotreload_timeout == 12.5
    monkeypatch.setenv("SENSEVOICE_HOTRELOAD_TIMEOUT", "7")  # the environment wins
    assert Settings().hotreload_timeout == 7


@pytest.mark.parametrize("name, value, words", [
    ("SENSEVOICE_HOTRELOAD_TIMEOUT", "0", "greater than 0"),
    ("SENSEVOICE_VAD_THRESHOLD", "1.5", "less than or equal to 1"),
    ("SENSEVOICE_MAX_SEGMENT_S", "0", "Input should be greater than or equal to 1"),
    ("SENSEVOICE_MAX_SEGMENT_S", "121", "Input should be less than or equal to 120"),
    ("SENSEVOICE_VAD_MIN_SPEECH_S", "-1", "Input should be greater than or equal to 0"),
    ("SENSEVOICE_BATCH_S", "0", "Input should be greater than 0"),
    ("SENSEVOICE_BATCH_S", "nan", "Input should be a finite number"),
    ("SENSEVOICE_MAX_AUDIO_S", "inf", "Input should be a finite number"),
    ("SENSEVOICE_SWAP_STRATEGY", "yolo", "'blue_green' or 'stop_first'"),
    ("SENSEVOICE_SUPERVISOR_ADDRESS", "tcp://0.0.0.0:5555", "not loopback"),
    ("SENSEVOICE_SUPERVISOR_ADDRESS", "http://127.0.0.1", "expected ipc://PATH"),
    ("SENSEVOICE_SUPERVISOR_ADDRESS", "ipc:///" + "x" * 120, "longer than"),
])
def test_invalid_service_settings_give_one_line_naming_variable_and_value(monkeypatch, name,
                                                                          value, words):
    from sensevoice_core.settings import SettingsError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"invalid setting: {name}={value!r}: ")
    assert words in message


def test_padding_over_a_quarter_of_a_segment_names_both_variables(monkeypatch):
    from sensevoice_core.settings import SettingsError, load_settings

    monkeypatch.setenv("SENSEVOICE_VAD_SPEECH_PAD_S", "3")
    monkeypatch.setenv("SENSEVOICE_MAX_SEGMENT_S", "10")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value) == ("invalid setting: SENSEVOICE_VAD_SPEECH_PAD_S=3 is more than a "
                                "quarter of SENSEVOICE_MAX_SEGMENT_S=10 (at most 2.5)")


def test_a_long_default_socket_path_names_the_fix(tmp_path):
    from sensevoice_core.settings import SettingsError

    settings = Settings(cache_dir=tmp_path / ("d" * 120))
    with pytest.raises(SettingsError, match="SENSEVOICE_SUPERVISOR_ADDRESS"):
        settings.client_address()


def test_ui_defaults_bind_loopback_and_reload_needs_no_token(monkeypatch):
    for name in ("UI_HOST", "UI_PORT", "ADMIN_TOKEN"):
        monkeypatch.delenv(f"SENSEVOICE_{name}", raising=False)
    settings = Settings()
    assert (settings.ui_host, settings.ui_port) == ("127.0.0.1", 7860)
    assert settings.ui_is_loopback() and not settings.reload_needs_token()


@pytest.mark.parametrize(("host", "token", "needs"), [
    ("0.0.0.0", "", True),  # reloading is off until a token is set
    ("0.0.0.0", "s3cret", True),
    ("127.0.0.1", "s3cret", True),  # a token that is set is always required
    ("localhost", "", False),
])
def test_reload_token_rules(monkeypatch, host, token, needs):
    monkeypatch.setenv("SENSEVOICE_UI_HOST", host)
    monkeypatch.setenv("SENSEVOICE_ADMIN_TOKEN", token)
    settings = Settings()
    assert settings.reload_needs_token() is needs
    assert (settings.admin_token is None) is (token == "")
    assert "s3cret" not in repr(settings)  # the token never shows up in logs or reprs
