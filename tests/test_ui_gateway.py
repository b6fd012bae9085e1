"""The UI's admin and upload checks, which decide before anything reaches the supervisor."""

from __future__ import annotations

import pytest

from sensevoice_core.client import SupervisorClient
from sensevoice_core.settings import Settings
from ui.gateway import FrontDoor, Gateway, RequestFailed
from ui.metrics import ServiceMetrics


def gateway(**values) -> Gateway:
    settings = Settings(supervisor_address="ipc:///tmp/sv-gateway-test.ipc", **values)
    door = FrontDoor(2)
    return Gateway(settings, SupervisorClient(settings=settings),
                   ServiceMetrics(lambda: None, door.held, door.capacity), door)


def test_reload_is_off_on_a_public_address_without_a_token():
    with pytest.raises(RequestFailed) as failure:
        gateway(ui_host="0.0.0.0").check_admin("anything")
    assert failure.value.status == 403 and failure.value.code == "reload_disabled"
    assert "SENSEVOICE_ADMIN_TOKEN" in failure.value.message


def test_the_token_must_match():
    guarded = gateway(ui_host="0.0.0.0", admin_token="s3cret")
    for wrong in (None, "", "s3cre", "s3cret "):
        with pytest.raises(RequestFailed, match="needs the admin token"):
            guarded.check_admin(wrong)
    guarded.check_admin("s3cret")


def test_loopback_without_a_token_reloads_freely():
    gateway().check_admin(None)


def test_upload_limits_name_the_file_and_the_setting():
    small = gateway(max_upload_mb=0.5)
    with pytest.raises(RequestFailed) as failure:
        small.check_upload(2**20, "talk.wav")
    assert failure.value.status == 413
    assert failure.value.message == ("talk.wav is larger than the limit of 0.5 MiB "
                                     "(SENSEVOICE_MAX_UPLOAD_MB)")
    with pytest.raises(RequestFailed, match="talk.wav is empty"):
        small.check_upload(0, "talk.wav")


def test_status_panel_shows_outside_text_inert():
    """Paths and error messages come from outside; they must not become markup in the page."""
    from sensevoice_core.protocol import ReloadOutcome
    from ui.views import code, reload_summary, status_markdown

    hostile = '<img src=x onerror="alert(1)"> **bold** `tick`'
    failed = ReloadOutcome(ok=False, origin="ui", requested_path=None, error=hostile)
    rendered = reload_summary(failed) + status_markdown(None, hostile)
    assert "<img" not in rendered and "&lt;img" in rendered
    assert "\\*\\*bold\\*\\*" in rendered and "\\`tick\\`" in rendered
    assert code("/models/a`b") == "`` /models/a`b ``"


def test_the_front_door_counts_what_the_page_holds_too():
    page_holds = [0]
    door = FrontDoor(3)
    door.count_also(lambda: page_holds[0])
    assert door.try_enter() and door.try_enter() and door.try_enter()
    assert door.full() and not door.try_enter()
    door.leave()
    page_holds[0] = 1  # the page's queue took the freed place
    assert door.full() and not door.try_enter()
    page_holds[0] = 0
    assert door.try_enter() and door.held() == 3
    refusal = door.busy()
    assert (refusal.status, refusal.code) == (429, "busy")
    assert "3 transcriptions (SENSEVOICE_MAX_QUEUE + SENSEVOICE_WORKERS)" in refusal.message
