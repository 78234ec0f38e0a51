"""The record of a PIN the token refused (hsm/pin.py): never the PIN, private, and failing safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hsm.pin
from hsm.config import HsmConfig
from hsm.pin import forget_refused, refused_before, remember_refused

PIN = "31415926"


def _cfg(tmp_path: Path, label: str = "t") -> HsmConfig:
    return HsmConfig(
        module="m", token_label=label, pin_file="unused", refused_pin_record=str(tmp_path / "rec")
    )


def test_a_refused_pin_is_recorded_without_the_pin_and_only_that_pin_is_held_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path)
    assert refused_before(cfg, PIN) is None
    assert remember_refused(cfg, PIN) is None
    record = tmp_path / "rec"
    assert record.stat().st_mode & 0o777 == 0o600
    text = record.read_text()
    assert PIN not in text and set(json.loads(text)) == {"token", "salt", "hmac", "at"}
    assert refused_before(cfg, PIN) == "earlier in this process"
    # Another process: no memory of it but the record, which it reads.
    monkeypatch.setattr(hsm.pin, "_refused_in_process", set())
    assert refused_before(cfg, PIN) == f"at {json.loads(text)['at']}"
    assert refused_before(cfg, PIN + "0") is None  # a corrected PIN is tried
    forget_refused(cfg)
    assert not record.exists()
    assert refused_before(cfg, PIN) is None


def test_an_unreadable_record_holds_the_pin_back(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "garbled")
    (tmp_path / "rec").write_text("{not json")
    assert "cannot be read" in (refused_before(cfg, "1234") or "")


def test_a_record_that_cannot_be_written_is_said(tmp_path: Path) -> None:
    cfg = HsmConfig(
        module="m", token_label="ro", pin_file="x", refused_pin_record=str(tmp_path / "no" / "rec")
    )
    why = remember_refused(cfg, "5555")
    assert why is not None and "cannot record" in why and "5555" not in why
    assert refused_before(cfg, "5555") == "earlier in this process"
