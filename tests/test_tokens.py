from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from mailkit.errors import ConfigError, TokenError
from mailkit.tracking.tokens import (
    Keyring,
    build_keyring,
    load_keyring,
    save_keyring_file,
    sign_token,
    verify_token,
)

SECRET_A = bytes(range(32))
SECRET_B = bytes(range(1, 33))


def test_round_trip_for_every_kind() -> None:
    keyring = Keyring({"k1": SECRET_A}, "k1")
    for kind, ids in [("open", (1,)), ("click", (123456789, 7)), ("unsubscribe", (0,))]:
        token = sign_token(keyring, kind, *ids)
        assert token == token.lower() and set(token) <= set("abcdefghijklmnopqrstuvwxyz234567.0189")
        assert verify_token(keyring, token, kind) == ids


def test_a_token_is_bound_to_its_kind() -> None:
    keyring = Keyring({"k1": SECRET_A}, "k1")
    token = sign_token(keyring, "open", 42)
    with pytest.raises(TokenError):
        verify_token(keyring, token, "unsubscribe")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1] + ("a" if t[-1] != "a" else "b"),  # tag changed
        lambda t: t.split(".")[0] + ".aa" + t[t.index(".", 3) :],  # payload changed
        lambda t: "zz" + t[2:],  # unknown key id
        lambda t: t + "x",
        lambda t: "",
        lambda t: "../../etc/passwd",
        lambda t: t.replace(".", ""),
    ],
)
def test_tampered_tokens_are_refused_with_one_generic_message(mutate: object) -> None:
    keyring = Keyring({"k1": SECRET_A}, "k1")
    token = sign_token(keyring, "click", 5, 9)
    bad = mutate(token)  # type: ignore[operator]
    with pytest.raises(TokenError) as info:
        verify_token(keyring, bad, "click")
    assert str(info.value) == "invalid or expired link"


def test_rotation_keeps_old_tokens_valid() -> None:
    old = Keyring({"k1": SECRET_A}, "k1")
    token = sign_token(old, "open", 77)
    rotated = Keyring({"k2": SECRET_B, "k1": SECRET_A}, "k2")
    assert verify_token(rotated, token, "open") == (77,)
    assert sign_token(rotated, "open", 77).startswith("k2.")
    retired = Keyring({"k2": SECRET_B}, "k2")
    with pytest.raises(TokenError):
        verify_token(retired, token, "open")


def test_case_folding_mail_servers_do_not_break_tokens() -> None:
    keyring = Keyring({"k1": SECRET_A}, "k1")
    token = sign_token(keyring, "bounce", 31337)
    assert verify_token(keyring, token.upper(), "bounce") == (31337,)


def test_keyring_repr_hides_secrets() -> None:
    keyring = build_keyring()
    assert base64.b64encode(keyring.keys["k1"]).decode() not in repr(keyring)
    assert repr(keyring.keys["k1"]) not in repr(keyring)


def test_weak_or_malformed_keys_are_refused() -> None:
    with pytest.raises(ConfigError):
        Keyring({"k1": b"short"}, "k1")
    with pytest.raises(ConfigError):
        Keyring({"K-1": SECRET_A}, "K-1")


def test_sqlite_workspace_gets_a_private_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILKIT_SECRET_KEYS", raising=False)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    url = f"sqlite:///{tmp_path}/ws.db"
    first = load_keyring(url)
    key_file = tmp_path / "ws.db.keys"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert load_keyring(url) == first


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    b64a, b64b = base64.b64encode(SECRET_A).decode(), base64.b64encode(SECRET_B).decode()
    monkeypatch.setenv("MAILKIT_SECRET_KEYS", f"k2:{b64b},k1:{b64a}")
    keyring = load_keyring("postgresql+psycopg://x@localhost/db")
    assert keyring.current == "k2" and keyring.keys["k1"] == SECRET_A
    monkeypatch.delenv("MAILKIT_SECRET_KEYS")
    path = save_keyring_file(Keyring({"k9": SECRET_A}, "k9"), tmp_path / "keys")
    monkeypatch.setenv("MAILKIT_SECRET_FILE", str(path))
    assert load_keyring().current == "k9"
    with pytest.raises(FileExistsError):
        save_keyring_file(keyring, path)


def test_a_server_database_without_a_secret_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MAILKIT_SECRET_KEYS", raising=False)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    with pytest.raises(ConfigError, match="MAILKIT_SECRET_KEYS"):
        load_keyring("postgresql+psycopg://x@localhost/db")
