"""The container tier's own logic, without podman: when it skips and why."""

from __future__ import annotations

import pytest

from tests.container import podman as pm


def test_no_podman_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    reason = pm.why_podman_cannot_run()
    assert reason is not None
    assert "podman is not installed" in reason
    assert "apt-get install podman runc debootstrap" in reason


def test_no_runc_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(pm, "RUNTIMES", ("/nonexistent/runc",))
    reason = pm.why_podman_cannot_run()
    assert reason is not None
    assert "runc" in reason


def test_missing_debootstrap_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pm, "image_exists", lambda _name: False)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(pm.PodmanError, match="debootstrap is not installed"):
        pm.ensure_base_image()
