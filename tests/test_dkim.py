"""DKIM keys, DNS records and signing, checked with dkimpy's own verifier."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailkit.dkim import (
    DKIMKey,
    DKIMSigner,
    DNSRecord,
    build_dkim_key,
    build_dkim_keypair,
    generate_dkim_key_files,
    load_dkim_key,
    render_dns_record,
    save_dkim_key,
)
from mailkit.errors import ConfigError

DOMAIN = "example.com"
RSA_SELECTOR = "mk2025"
ED_SELECTOR = "mk2025e"
FIXED_TIME = 1_700_000_000
# A throwaway 512-bit key: too small for DKIM (cryptography refuses to generate one).
WEAK_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAx6b0DqFZ+4p8Zy/S
6LV3r4+bX6rEeBhiMresJtkLbsaqvbPxCsa9S7PItx9D2Tb9l/MHuMgG1gxgK2/g
ihj+fwIDAQABAkEAxR1QWCF1daOEr1vIH3kKcYqXHBy9XNS2Hty4WqJvZy19J26C
nYeI4WDr3sfrk9YWkYRh5M9MDYv2uB343R4yAQIhAPpe+NVSnOg1kmIcFAcT82bc
l+1AbIswAesO/E1DXIVLAiEAzCQQyBxlcGX7HOveH8tVpwi7oMOe5eJ20QMMUrnb
jx0CIDaH7OZ5gddJo8JenzYTcFYdAbIY8As4v5I0x1sEqugVAiBFk9FIcy07xvZ0
oAvAKGyUFszkeWgyECLREEnl9ETaHQIgL7JrC9txAxXyKixUjHIxViTPfWJubL+Z
AXxW6FVBbD4=
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def rsa_key() -> DKIMKey:
    return build_dkim_keypair()


@pytest.fixture(scope="module")
def ed_key() -> DKIMKey:
    return build_dkim_keypair(algorithm="ed25519")


@pytest.fixture(scope="module")
def signer(rsa_key: DKIMKey, ed_key: DKIMKey) -> DKIMSigner:
    return DKIMSigner(
        domain=DOMAIN,
        selector=RSA_SELECTOR,
        rsa_key=rsa_key,
        ed25519_key=ed_key,
        ed25519_selector=ED_SELECTOR,
    )


@pytest.fixture
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pin dkimpy's t= tag so that its signatures can be compared byte for byte with ours,
    which are given ``timestamp=FIXED_TIME``."""
    monkeypatch.setattr(dkim, "time", SimpleNamespace(time=lambda: float(FIXED_TIME)))
    yield


def dns_for(*records: DNSRecord) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from the records we would publish."""
    answers = {f"{r.name}.".encode(): "".join(r.strings).encode() for r in records}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return answers.get(name)

    return dnsfunc


def build_campaign_message(
    *, subject: str = "Spring sale: 20% off everything", body_text: str | None = None
) -> bytes:
    """A realistic marketing message: text + HTML alternative, List-Unsubscribe(-Post)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Example Shop <news@example.com>"
    msg["To"] = "山田 太郎 <taro@example.org>"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2025, 4, 1, 9, 0, tzinfo=UTC))
    msg["Message-ID"] = "<20250401090000.abc123@example.com>"
    msg["Reply-To"] = "support@example.com"
    msg["List-Unsubscribe"] = "<https://t.example.com/u/abc123>, <mailto:unsub@example.com>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["X-Campaign"] = "spring-2025"
    text = body_text or "\n".join(f"Line {i}: our spring catalogue is here." for i in range(40))
    msg.set_content(text, cte="8bit" if not text.isascii() else "7bit")
    rows = "".join(
        f'<tr><td><a href="https://t.example.com/c/{i}">Item {i}</a></td><td>¥{i * 100}</td></tr>'
        for i in range(40)
    )
    msg.add_alternative(f"<html><body><table>{rows}</table></body></html>", subtype="html")
    return msg.as_bytes()


def verifies(message: bytes, idx: int, dnsfunc: Callable[..., bytes | None]) -> bool:
    """dkimpy's verdict on signature ``idx``; a body hash mismatch raises, which is a fail."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.ValidationError:
        return False


def signature_tags(signed: bytes, idx: int = 0) -> dict[bytes, bytes]:
    headers = [v for k, v in dkim.rfc822_parse(signed)[0] if k.lower() == b"dkim-signature"]
    return dict(dkim.util.parse_tag_value(headers[idx]))


# --- signing ---------------------------------------------------------------------------------


def test_both_signatures_verify_with_dkimpy(signer: DKIMSigner) -> None:
    signed = signer.sign(build_campaign_message())
    dnsfunc = dns_for(*signer.render_dns_records())

    assert signed.startswith(b"DKIM-Signature: ")
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert verifies(signed, 0, dnsfunc)
    assert signature_tags(signed, 0)[b"a"] == b"rsa-sha256"
    assert verifies(signed, 1, dnsfunc)
    assert signature_tags(signed, 1)[b"a"] == b"ed25519-sha256"
    assert signature_tags(signed, 1)[b"s"] == ED_SELECTOR.encode()


def test_rsa_only_signer_adds_one_signature(rsa_key: DKIMKey) -> None:
    signer = DKIMSigner(domain=DOMAIN, selector=RSA_SELECTOR, rsa_key=rsa_key)
    signed = signer.sign(build_campaign_message())

    assert signed.count(b"DKIM-Signature:") == 1
    assert dkim.verify(signed, dnsfunc=dns_for(*signer.render_dns_records()))


def test_signed_header_list_and_canonicalisation(signer: DKIMSigner) -> None:
    signed = signer.sign(build_campaign_message())

    for idx in (0, 1):
        tags = signature_tags(signed, idx)
        signed_headers = [h.strip() for h in re.sub(rb"\s+", b"", tags[b"h"]).split(b":")]
        assert tags[b"c"] == b"relaxed/relaxed"
        assert tags[b"d"] == DOMAIN.encode()
        assert signed_headers.count(b"from") == 2  # one From in the message, signed once extra
        for name in (
            b"list-unsubscribe",
            b"list-unsubscribe-post",
            b"subject",
            b"to",
            b"date",
            b"message-id",
            b"mime-version",
            b"content-type",
            b"reply-to",
        ):
            assert name in signed_headers, name
        assert b"x-campaign" not in signed_headers


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: m.replace(b"Line 7:", b"Line 8:"), id="body"),
        pytest.param(lambda m: m.replace(b"Spring sale", b"Spring SALE"), id="subject"),
        pytest.param(
            lambda m: m.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b""),
            id="removed-list-unsubscribe-post",
        ),
        pytest.param(
            lambda m: re.sub(
                rb"(DKIM-Signature:.*?\r\n)(?=[^ \t])",
                rb"\1From: attacker@evil.example\r\n",
                m,
                count=1,
                flags=re.S,
            ),
            id="added-from",
        ),
    ],
)
def test_tampering_breaks_every_signature(
    signer: DKIMSigner, tamper: Callable[[bytes], bytes]
) -> None:
    signed = signer.sign(build_campaign_message())
    dnsfunc = dns_for(*signer.render_dns_records())
    tampered = tamper(signed)
    assert tampered != signed

    assert verifies(signed, 0, dnsfunc) and verifies(signed, 1, dnsfunc)
    assert not verifies(tampered, 0, dnsfunc)
    assert not verifies(tampered, 1, dnsfunc)


def test_japanese_subject_and_8bit_body(signer: DKIMSigner) -> None:
    message = build_campaign_message(
        subject="【春のセール】全品20%オフ ― 山田様へ",
        body_text="山田 太郎 様\n\n春のセールのお知らせです。東京都の店舗でもどうぞ。\n",
    )
    assert b"=?utf-8?" in message.lower()  # RFC 2047 encoded Subject
    assert "春のセール".encode() in message  # raw 8-bit UTF-8 body

    signed = signer.sign(message)
    dnsfunc = dns_for(*signer.render_dns_records())
    assert verifies(signed, 0, dnsfunc)
    assert verifies(signed, 1, dnsfunc)


def test_lf_line_endings_are_kept(signer: DKIMSigner) -> None:
    message = build_campaign_message().replace(b"\r\n", b"\n")
    signed = signer.sign(message)

    assert b"\r\n" not in signed
    assert dkim.verify(signed, dnsfunc=dns_for(*signer.render_dns_records()))


def dkimpy_header_list(message: bytes) -> list[bytes]:
    """The h= list dkimpy would choose with List-Unsubscribe-Post added to its set."""
    reader = dkim.DKIM(message)
    reader.should_sign.add(b"list-unsubscribe-post")
    return [name.lower() for name in reader.default_sign_headers()]


def dkimpy_rsa_signature(message: bytes, rsa_key: DKIMKey, h_list: list[bytes]) -> bytes:
    """dkimpy's own (pure-Python) relaxed/relaxed RSA signature header of ``message``."""
    pem = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    header: bytes = dkim.sign(
        message,
        RSA_SELECTOR.encode(),
        DOMAIN.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=h_list,
        linesep=dkim.util.get_linesep(message),
    )
    return header


def dkimpy_ed25519_signature(message: bytes, ed_key: DKIMKey, h_list: list[bytes]) -> bytes:
    """dkimpy's own (PyNaCl) relaxed/relaxed Ed25519-SHA256 signature header of ``message``."""
    seed = ed_key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    header: bytes = dkim.sign(
        message,
        ED_SELECTOR.encode(),
        DOMAIN.encode(),
        base64.b64encode(seed),
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"ed25519-sha256",
        include_headers=h_list,
        linesep=dkim.util.get_linesep(message),
    )
    return header


def test_native_signature_is_byte_identical_to_dkimpy(
    signer: DKIMSigner, rsa_key: DKIMKey, ed_key: DKIMKey, fixed_time: None
) -> None:
    message = build_campaign_message(subject="【春のセール】全品20%オフ")
    signed = signer.sign(message, timestamp=FIXED_TIME)
    h_list = dkimpy_header_list(message)

    pure_rsa = dkimpy_rsa_signature(message, rsa_key, h_list)
    pure_ed = dkimpy_ed25519_signature(message, ed_key, h_list)

    assert signature_tags(signed)[b"t"] == str(FIXED_TIME).encode()
    assert signed == pure_rsa + pure_ed + message


def test_rsa_signing_does_not_use_dkimpy_pure_python_rsa(
    signer: DKIMSigner, rsa_key: DKIMKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    def pure_python_rsa(*args: object) -> bytes:
        raise AssertionError("dkimpy's pure-Python RSA was called")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", pure_python_rsa)
    with pytest.raises(AssertionError, match="pure-Python"):  # the patch does take effect
        dkim.sign(build_campaign_message(), b"s", b"example.com", pem)

    signed = signer.sign(build_campaign_message())
    assert verifies(signed, 0, dns_for(*signer.render_dns_records()))


def test_default_header_selection_matches_dkimpy_plus_list_unsubscribe_post(
    signer: DKIMSigner, fixed_time: None
) -> None:
    message = build_campaign_message()
    plain = dkim.DKIM(message)
    expected = [h.lower() for h in plain.default_sign_headers()]
    assert b"list-unsubscribe-post" not in expected  # why we extend dkimpy's list

    signed_headers = re.sub(rb"\s+", b"", signature_tags(signer.sign(message))[b"h"]).split(b":")
    assert sorted(signed_headers) == sorted([*expected, b"list-unsubscribe-post"])


def test_message_without_from_is_refused(signer: DKIMSigner) -> None:
    with pytest.raises(dkim.ParameterError, match="From"):
        signer.sign(b"To: a@example.org\r\nSubject: x\r\n\r\nbody\r\n")


def test_signer_configuration_errors(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    with pytest.raises(ConfigError, match="RSA"):
        DKIMSigner(domain=DOMAIN, selector="s", rsa_key=ed_key)
    with pytest.raises(ConfigError, match="own selector"):
        DKIMSigner(domain=DOMAIN, selector="s", rsa_key=rsa_key, ed25519_key=ed_key)
    with pytest.raises(ConfigError, match="differ"):
        DKIMSigner(
            domain=DOMAIN, selector="s", rsa_key=rsa_key, ed25519_key=ed_key, ed25519_selector="S"
        )
    with pytest.raises(ConfigError, match="Ed25519"):
        DKIMSigner(
            domain=DOMAIN, selector="s", rsa_key=rsa_key, ed25519_key=rsa_key, ed25519_selector="e"
        )
    with pytest.raises(ConfigError, match="selector"):
        DKIMSigner(domain=DOMAIN, selector="../etc", rsa_key=rsa_key)
    with pytest.raises(ConfigError, match="domain"):
        DKIMSigner(domain="exa mple.com", selector="s", rsa_key=rsa_key)


def test_signer_is_immutable(signer: DKIMSigner) -> None:
    with pytest.raises(AttributeError):
        signer.domain = "evil.example"  # type: ignore[misc]


def test_japanese_domain_signs_with_its_a_label(rsa_key: DKIMKey) -> None:
    signer = DKIMSigner(domain="例え.jp", selector="s1", rsa_key=rsa_key)
    (record,) = signer.render_dns_records()
    signed = signer.sign(build_campaign_message())

    assert record.name == "s1._domainkey.xn--r8jz45g.jp"
    assert signature_tags(signed)[b"d"] == b"xn--r8jz45g.jp"
    assert dkim.verify(signed, dnsfunc=dns_for(record))


# --- keys and files --------------------------------------------------------------------------


def test_build_keypair_sizes_and_refusals() -> None:
    assert build_dkim_keypair(bits=1024).bits == 1024
    assert build_dkim_keypair(algorithm="ed25519").bits == 256
    with pytest.raises(ConfigError, match="1024"):
        build_dkim_keypair(bits=512)
    with pytest.raises(ConfigError, match="algorithm"):
        build_dkim_keypair(algorithm="dsa")  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_saved_key_is_0600_and_loads_back(
    tmp_path: Path, algorithm: str, rsa_key: DKIMKey, ed_key: DKIMKey
) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    old_umask = os.umask(0)  # a permissive umask must not make the key readable by others
    try:
        path = save_dkim_key(key, tmp_path / "k.pem")
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_dkim_key(path)
    assert loaded.algorithm == algorithm
    assert loaded.public_key_base64 == key.public_key_base64


def test_save_refuses_to_overwrite(tmp_path: Path, rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    path = save_dkim_key(rsa_key, tmp_path / "k.pem")
    before = path.read_bytes()

    with pytest.raises(ConfigError, match="overwrite=True"):
        save_dkim_key(ed_key, path)
    assert path.read_bytes() == before

    os.chmod(path, 0o644)
    save_dkim_key(ed_key, path, overwrite=True)
    assert load_dkim_key(path).algorithm == "ed25519"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]  # no temp file left behind


def test_load_accepts_pkcs1_and_dknewkey_ed25519(tmp_path: Path) -> None:
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = rsa_private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert build_dkim_key(pkcs1).bits == 2048

    ed_private = ed25519.Ed25519PrivateKey.generate()
    seed = ed_private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    path = tmp_path / "ed.key"
    path.write_bytes(base64.b64encode(seed) + b"\n")
    loaded = load_dkim_key(path)
    assert loaded.algorithm == "ed25519"
    assert loaded.public_key_base64 == DKIMKey("ed25519", ed_private).public_key_base64


def test_load_rejects_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_dkim_key(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"garbage\.pem"):
        load_dkim_key(garbage)
    small = tmp_path / "small.pem"
    small.write_bytes(WEAK_RSA_PEM)
    with pytest.raises(ConfigError, match="512 bits"):
        load_dkim_key(small)


def test_generate_key_files(tmp_path: Path) -> None:
    directory = tmp_path / "keys" / "nested"
    path, record = generate_dkim_key_files(
        domain="Example.COM", selector="mk2025", directory=directory
    )

    assert path == directory / "mk2025._domainkey.example.com.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert record.name == "mk2025._domainkey.example.com"
    assert record == render_dns_record(load_dkim_key(path), domain="example.com", selector="mk2025")

    with pytest.raises(ConfigError, match="already exists"):
        generate_dkim_key_files(domain="example.com", selector="mk2025", directory=directory)
    _, ed_record = generate_dkim_key_files(
        domain="example.com",
        selector="mk2025",
        directory=directory,
        algorithm="ed25519",
        overwrite=True,
    )
    assert "k=ed25519" in ed_record.value
    assert load_dkim_key(path).algorithm == "ed25519"


def test_generate_key_files_checks_names_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="selector"):
        generate_dkim_key_files(domain="example.com", selector="a/b", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- DNS records -----------------------------------------------------------------------------


def test_rsa_dns_record(rsa_key: DKIMKey) -> None:
    record = render_dns_record(rsa_key, domain="example.com", selector="mk2025")

    assert record.name == "mk2025._domainkey.example.com"
    prefix = "v=DKIM1; k=rsa; p="
    assert record.value.startswith(prefix)
    der = base64.b64decode(record.value.removeprefix(prefix), validate=True)
    assert der == rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


def test_ed25519_dns_record(ed_key: DKIMKey) -> None:
    record = render_dns_record(ed_key, domain="example.com", selector="mk2025e")

    prefix = "v=DKIM1; k=ed25519; p="
    assert record.value.startswith(prefix)
    raw = base64.b64decode(record.value.removeprefix(prefix), validate=True)
    assert len(raw) == 32  # RFC 8463: the bare public key, not SubjectPublicKeyInfo
    assert raw == ed_key.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert len(record.strings) == 1


def test_zone_line_splits_long_values(rsa_key: DKIMKey) -> None:
    record = render_dns_record(rsa_key, domain="example.com", selector="mk2025")
    assert len(record.value) > 255  # an RSA-2048 record needs two strings

    line = record.zone_line()
    assert line.startswith("mk2025._domainkey.example.com. IN TXT ")
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record.value

    long = DNSRecord(name="s._domainkey.example.com", value="v=DKIM1; k=rsa; p=" + "A" * 700)
    assert [len(s) for s in long.strings] == [255, 255, 208]
    assert long.zone_line(ttl=3600).startswith('s._domainkey.example.com. 3600 IN TXT "v=DKIM1;')


def test_dns_record_rejects_bad_names(rsa_key: DKIMKey) -> None:
    with pytest.raises(ConfigError):
        render_dns_record(rsa_key, domain="example.com", selector="")
    with pytest.raises(ConfigError):
        render_dns_record(rsa_key, domain="-bad-.com", selector="s")


def _varied_bodies() -> list[bytes]:
    import random

    rng = random.Random(2026)
    pieces = [b"a", b"B64+/=", b" ", b"  ", b"\t", b" \t ", b"\r\n", "日本語".encode(), b"x" * 80]
    bodies = [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        b" ",
        b"line with trailing space \r\n",
        b"no final line break  \t",
        b"\t\tindented\r\n\r\n \r\n",
        base64.encodebytes(os.urandom(3000)).replace(b"\n", b"\r\n"),
        b"word " * 400 + b"\r\n",  # single spaces, one of them before the line end
        b"a  b \r\n" * 100 + b"\tend\t\r\n\r\n",  # many lines with blank runs, tabs at the ends
    ]
    for _ in range(300):
        bodies.append(b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60))))
    return bodies


def test_relaxed_body_shortcut_equals_dkimpy_canonicalisation() -> None:
    from dkim.canonicalization import Relaxed

    from mailkit.dkim import _relaxed_body

    for body in _varied_bodies():
        assert _relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_signatures_stay_byte_identical_to_dkimpy_for_varied_bodies(
    rsa_key: DKIMKey, fixed_time: None
) -> None:
    signer = DKIMSigner(domain=DOMAIN, selector=RSA_SELECTOR, rsa_key=rsa_key)
    head = build_campaign_message().split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    h_list = dkimpy_header_list(head)
    for body in _varied_bodies()[:40]:
        message = head + body
        signed = signer.sign(message, timestamp=FIXED_TIME)
        assert signed == dkimpy_rsa_signature(message, rsa_key, h_list) + message, body


def _varied_messages() -> list[bytes]:
    blocks = [
        # mixed-case names, runs of spaces and tabs, folded values, a field that occurs twice
        b"fROM:  Shop \t <news@example.com>  \r\nTo: a@example.org,\r\n\t b@example.org\r\n"
        b"Subject: \tHello   world \r\nTO: c@example.org\r\nX-Mailer: mk\r\n",
        # an mbox "From " line, skipped
        b"From MAILER-DAEMON Mon Apr  1 09:00:00 2025\r\nFrom: news@example.com\r\nSubject: x\r\n",
        # fields never signed (Return-Path, Received), folded Message-ID, both List- fields
        b"Return-Path: <b@example.com>\r\nReceived: from x\r\n by y\r\nFrom: news@example.com\r\n"
        b"Reply-To: r@example.com\r\nMessage-ID:\r\n <abc@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"List-Unsubscribe: <https://t.example.com/u>\r\n",
        # two From fields (both signed, plus the extra listing), an empty value, odd name chars
        b"From: a@example.com\r\nFrom: b@example.com\r\nSubject:\r\nX-Odd_Name!: v\r\n"
        b"Content-Type: text/plain;\r\n\tcharset=utf-8\r\n",
    ]
    messages = []
    for block in blocks:
        messages += [
            block + b"\r\nbody line \r\n\r\n",  # ordinary
            block,  # no body, no empty line
            block + b"\r\n",  # empty body
            (block + b"\r\nbody\r\n").replace(b"\r\n", b"\n"),  # LF line ends
            block.replace(b"\r\n", b"\n", 1) + b"\r\nmixed\nline ends\r\n",  # both kinds
        ]
    return messages


@pytest.mark.parametrize("message", _varied_messages())
def test_signatures_stay_byte_identical_to_dkimpy_for_varied_headers(
    signer: DKIMSigner, rsa_key: DKIMKey, ed_key: DKIMKey, fixed_time: None, message: bytes
) -> None:
    h_list = dkimpy_header_list(message)
    expected = (
        dkimpy_rsa_signature(message, rsa_key, h_list)
        + dkimpy_ed25519_signature(message, ed_key, h_list)
        + message
    )

    assert signer.sign(message, timestamp=FIXED_TIME) == expected


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b" starts folded\r\nFrom: a@example.com\r\n\r\nbody\r\n", id="continuation"),
        pytest.param(b"From: a@example.com\r\nnot a field\r\n\r\nbody\r\n", id="no-colon"),
        pytest.param(b"From: a@example.com\r\n: no name\r\n\r\nbody\r\n", id="empty-name"),
    ],
)
def test_malformed_header_block_is_refused(signer: DKIMSigner, message: bytes) -> None:
    with pytest.raises(dkim.MessageFormatError):
        signer.sign(message)
