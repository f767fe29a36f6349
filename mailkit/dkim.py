"""DKIM: key generation, the DNS TXT record to publish, and fast signing.

A campaign signs every message, so signing is done here rather than by dkimpy's ``DKIM.sign``:
dkimpy computes RSA in pure Python (~10 ms for RSA-2048, against under 1 ms in OpenSSL through
``cryptography``), and even with the RSA step swapped out, its per-message set-up (a DKIM
object, a regex parse of the whole message, canonicalisation of every header field) cost about
half as much again as the RSA signature itself. What is signed and how it is written follow
dkimpy exactly: its header list, its canonicalisation (its own functions where they are
cheap), its ``fold`` for the DKIM-Signature field; the tests check every signature byte for
byte against dkimpy's own and verify it with dkimpy's verifier. Ed25519 (RFC 8463) is signed
through ``cryptography`` as well.

Typical use::

    key = build_dkim_keypair()
    save_dkim_key(key, "keys/mk2025.pem")
    print(render_dns_record(key, domain="example.com", selector="mk2025").zone_line())
    signer = DKIMSigner(domain="example.com", selector="mk2025", rsa_key=key)
    signed = signer.sign(message_bytes)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

import dkim
import dkim.util
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (
    correct_empty_body,
    strip_trailing_lines,
)

from mailkit.errors import ConfigError

__all__ = [
    "DKIMKey",
    "DKIMSigner",
    "DNSRecord",
    "build_dkim_key",
    "build_dkim_keypair",
    "generate_dkim_key_files",
    "load_dkim_key",
    "render_dns_record",
    "save_dkim_key",
]

Algorithm: TypeAlias = Literal["rsa", "ed25519"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 8301: receivers ignore RSA keys under 1024 bits. Above 4096 the TXT record outgrows what
# many DNS providers' forms accept, and signing gets slow for no practical gain.
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096

# dkimpy's default header set (RFC 6376 §5.4.1) lacks List-Unsubscribe-Post, which RFC 8058
# requires to be covered by the signature for one-click unsubscribe to be honoured.
EXTRA_SIGNED_HEADERS = frozenset({b"list-unsubscribe-post"})

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# One TXT character-string holds at most 255 octets (RFC 1035 §3.3.14).
_TXT_CHUNK = 255


@dataclass(frozen=True)
class DKIMKey:
    """A DKIM private key: RSA (any size 1024–4096) or Ed25519."""

    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        expected = rsa.RSAPrivateKey if self.algorithm == "rsa" else ed25519.Ed25519PrivateKey
        if self.algorithm not in ("rsa", "ed25519") or not isinstance(self.private_key, expected):
            raise ConfigError(
                f"DKIMKey(algorithm={self.algorithm!r}) was given a "
                f"{type(self.private_key).__name__}; use build_dkim_keypair() or load_dkim_key()"
            )

    @property
    def bits(self) -> int:
        """Key size in bits (256 for Ed25519)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.key_size
        return 256

    @property
    def public_key_base64(self) -> str:
        """The ``p=`` value: base64 DER SubjectPublicKeyInfo (RSA) or raw 32 bytes (Ed25519)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            raw = self.private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            raw = self.private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class DNSRecord:
    """The TXT record that publishes a DKIM public key."""

    name: str
    value: str

    @property
    def strings(self) -> tuple[str, ...]:
        """The value cut into character-strings of at most 255 octets, as DNS stores it."""
        return tuple(
            self.value[i : i + _TXT_CHUNK] for i in range(0, len(self.value), _TXT_CHUNK)
        ) or ("",)

    def zone_line(self, *, ttl: int | None = None) -> str:
        """The record as one zone-file line, e.g. ``s._domainkey.example.com. IN TXT "…" "…"``.

        Long values are split into several quoted strings because a single one may not exceed
        255 octets; resolvers hand verifiers the concatenation.
        """
        quoted = " ".join(
            '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in self.strings
        )
        ttl_part = f"{ttl} " if ttl is not None else ""
        return f"{self.name}. {ttl_part}IN TXT {quoted}"


def build_dkim_keypair(*, algorithm: Algorithm = "rsa", bits: int = 2048) -> DKIMKey:
    """Generate a new DKIM key. ``bits`` applies to RSA only (Ed25519 keys are always 256)."""
    if algorithm == "ed25519":
        return DKIMKey("ed25519", ed25519.Ed25519PrivateKey.generate())
    if algorithm != "rsa":
        raise ConfigError(f"unknown DKIM algorithm {algorithm!r}; use 'rsa' or 'ed25519'")
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ConfigError(
            f"RSA DKIM keys must have {MIN_RSA_BITS}–{MAX_RSA_BITS} bits, not {bits}; "
            "2048 is the usual choice"
        )
    return DKIMKey("rsa", rsa.generate_private_key(public_exponent=65537, key_size=bits))


def build_dkim_key(data: bytes) -> DKIMKey:
    """A DKIMKey from unencrypted PEM (PKCS#8 or PKCS#1), or from the base64 Ed25519 seed
    that dkimpy's ``dknewkey`` writes."""
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        seed = _decode_ed25519_seed(data)
        if seed is None:
            raise ConfigError(
                f"not a usable DKIM private key ({exc}); expected an unencrypted PEM key as "
                "written by save_dkim_key() or openssl genpkey"
            ) from exc
        return DKIMKey("ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"the RSA key has {loaded.key_size} bits; receivers ignore DKIM keys under "
                f"{MIN_RSA_BITS} bits (RFC 8301): generate a 2048-bit one"
            )
        return DKIMKey("rsa", loaded)
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        return DKIMKey("ed25519", loaded)
    raise ConfigError(f"a {type(loaded).__name__} cannot sign DKIM; use an RSA or Ed25519 key")


def _decode_ed25519_seed(data: bytes) -> bytes | None:
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return seed if len(seed) == 32 else None


def load_dkim_key(path: str | os.PathLike[str]) -> DKIMKey:
    """Read a DKIM private key file (see :func:`build_dkim_key` for the accepted formats)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"DKIM key file {os.fspath(path)!r} does not exist; create one with "
            "generate_dkim_key_files() or `mailkit dkim keygen`"
        ) from exc
    try:
        return build_dkim_key(data)
    except ConfigError as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}") from exc


def save_dkim_key(key: DKIMKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600).

    The file is created with mode 0600 from the start, so the key is never readable by others,
    not even for a moment. An existing file is kept unless ``overwrite=True`` (replacing a key
    breaks every signature checked against the DNS record published for it); the replacement is
    atomic.
    """
    target = Path(path)
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not overwrite:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(
                f"DKIM key file {os.fspath(target)!r} already exists; pass overwrite=True to "
                "replace it, then publish the new DNS record"
            ) from exc
        _write_private(fd, pem)
        return target
    # mkstemp creates the file 0600 with O_EXCL; os.replace makes the swap atomic.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        _write_private(fd, pem)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _write_private(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as fh:
        # The umask can only narrow 0600; fchmod makes the mode exact even under an odd umask.
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def render_dns_record(key: DKIMKey, *, domain: str, selector: str) -> DNSRecord:
    """The TXT record to publish for ``key`` at ``SELECTOR._domainkey.DOMAIN``."""
    name = f"{_normalise_dns_name(selector, 'selector')}._domainkey.{_normalise_domain(domain)}"
    return DNSRecord(name=name, value=f"v=DKIM1; k={key.algorithm}; p={key.public_key_base64}")


def generate_dkim_key_files(
    *,
    domain: str,
    selector: str,
    directory: str | os.PathLike[str],
    algorithm: Algorithm = "rsa",
    bits: int = 2048,
    overwrite: bool = False,
) -> tuple[Path, DNSRecord]:
    """Generate a key, save it as ``DIRECTORY/SELECTOR._domainkey.DOMAIN.pem`` (mode 0600) and
    return that path with the DNS record to publish. The directory is created (mode 0700) if
    missing."""
    # Check the names before spending time on key generation.
    _normalise_domain(domain)
    _normalise_dns_name(selector, "selector")
    key = build_dkim_keypair(algorithm=algorithm, bits=bits)
    record = render_dns_record(key, domain=domain, selector=selector)
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = save_dkim_key(key, folder / f"{record.name}.pem", overwrite=overwrite)
    return path, record


def _normalise_domain(domain: str) -> str:
    name = domain.strip().rstrip(".")
    try:
        # DKIM's d= and DNS names are ASCII: Japanese domains go in as their A-label (xn--).
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError as exc:
        raise ConfigError(f"DKIM domain {domain!r} is not a valid domain name") from exc
    return _normalise_dns_name(ascii_name, "domain")


def _normalise_dns_name(value: str, what: str) -> str:
    if not _DNS_NAME_RE.fullmatch(value) or len(value) > 253:
        raise ConfigError(
            f"DKIM {what} {value!r} is not a valid DNS name: use letters, digits, '-' and '.'"
        )
    return value.lower()


# The header fields signed by default: dkimpy's list (RFC 6376 §5.4.1's recommendation) plus
# List-Unsubscribe-Post; From is listed once more than it occurs ("oversigned").
_SIGNED = frozenset(dkim.DKIM.SHOULD) | frozenset(dkim.DKIM.FROZEN) | EXTRA_SIGNED_HEADERS
_OVERSIGNED = frozenset(dkim.DKIM.FROZEN)
_SIGNATURE_HEADER = b"DKIM-Signature"
_HEADER_NAME_RE = re.compile(rb"([\x21-\x7e]+?):")
_LINE_END_RE = re.compile(rb"\r?\n")
_WSP_RE = re.compile(rb"[\t ]+")


def _split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields (name, value with its line ends) and the body, read as dkimpy's
    ``rfc822_parse`` reads them: any line end counts as CRLF, an mbox "From " line is skipped,
    a line that is neither a field nor a continuation is refused."""
    if message.count(b"\n") != message.count(b"\r\n"):
        message = _LINE_END_RE.sub(b"\r\n", message)
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    block, body = (message, b"") if end < 0 else (message[:end], message[end + 4 :])
    headers: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:  # the end of a message that has no body
            break
        if line[0] in (0x09, 0x20):
            if not headers:
                raise dkim.MessageFormatError("the header block starts with a continuation line")
            name, value = headers[-1]
            headers[-1] = (name, value + line + b"\r\n")
            continue
        match = _HEADER_NAME_RE.match(line)
        if match is not None:
            headers.append((match.group(1), line[match.end() :] + b"\r\n"))
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, body


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """One header field in relaxed canonical form (RFC 6376 §3.4.2), as dkimpy writes it."""
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:  # else the regular expression would change nothing
        value = _WSP_RE.sub(b" ", value)
    return name + b":" + value.strip()


def _signed_headers(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, ...], bytes]:
    """The ``h=`` list (lower-case names) and the canonical header data it covers.

    A name listed n times covers the last n occurrences of that field, bottom up (RFC 6376
    §5.4.2); a name listed more often than the field occurs (From, oversigned) covers nothing
    the extra time, so a From added later breaks the signature.
    """
    lowered = [name.lower() for name, _ in headers]
    positions: dict[bytes, list[int]] = {}
    for index, name in enumerate(lowered):
        if name in _SIGNED:
            positions.setdefault(name, []).append(index)
    if b"from" not in positions:
        raise dkim.ParameterError("The From header field MUST be signed")
    listed = [name for name in lowered if name in positions]
    listed += [name for name in listed if name in _OVERSIGNED]
    canonical = []
    for name in listed:
        found = positions[name]
        if found:
            canonical.append(_relaxed_header(name, headers[found.pop()][1]) + b"\r\n")
    return tuple(listed), b"".join(canonical)


def _signature_header(
    fields: list[tuple[bytes, bytes]],
    canonical_headers: bytes,
    sign: Callable[[bytes], bytes],
    linesep: bytes,
) -> bytes:
    """The DKIM-Signature field for ``fields`` (the tags up to ``bh=``), signed by ``sign``
    over the SHA-256 digest of the canonical headers and of this field with ``b=`` empty.

    Formatting is dkimpy's, with its own helpers: the tag list is folded at column 72 with a
    60-character placeholder for ``b=`` (so ``b=`` starts a line of its own and refolding after
    signing moves nothing before it), the placeholder is cut out for hashing, and the list with
    the real signature is folded again.
    """
    placeholder = b"; ".join(b"=".join(tag) for tag in [*fields, (b"b", b"0" * 60)])
    folded = dkim.fold(placeholder, namelen=len(_SIGNATURE_HEADER), linesep=b"\r\n")
    # dkimpy cuts b='s value with its RE_BTAG expression (~25 us here). b= is the last tag and
    # its value our zeros, so the cut is at its "b="; the expression stays for anything else.
    cut = folded.rfind(b"b=") + 2
    if cut > 1 and not folded[cut:].translate(None, b"0\r\n "):
        unsigned = folded[:cut]
    else:
        unsigned = dkim.RE_BTAG.sub(b"\\1", folded)
    digest = hashlib.sha256(
        canonical_headers + _relaxed_header(b"dkim-signature", b" " + unsigned)
    ).digest()
    signed = [*fields, (b"b", base64.b64encode(sign(digest)))]
    value: bytes = dkim.fold(
        b"; ".join(b"=".join(tag) for tag in signed) + linesep,
        namelen=len(_SIGNATURE_HEADER),
        linesep=linesep,
    )
    return _SIGNATURE_HEADER + b": " + value


# dkimpy's strip_trailing_whitespace, compiled once (_WSP_RE is its compress_whitespace).
_TRAILING_WSP_RE = re.compile(rb"[\t ]+\r\n")


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation (RFC 6376 3.4.4), without its regular expression
    passes where a substring search shows they would change nothing.

    Its first two steps (``strip_trailing_whitespace``, ``compress_whitespace``) only act on a
    space or tab before a line end, on a tab, or on two blanks in a row; a base64 part has none
    of these, and text with single spaces between words none of the latter two. A substring
    search over 8 KB costs a few microseconds, an expression pass tens.
    ``strip_trailing_lines`` and ``correct_empty_body`` then run as in dkimpy. Tests compare
    the result with dkimpy's on varied bodies.
    """
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP_RE.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RE.sub(b" ", body)
    return correct_empty_body(strip_trailing_lines(body))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DKIMSigner:
    """Signs messages for one domain: RSA-SHA256, plus Ed25519-SHA256 when an Ed25519 key is
    given (RFC 8463 dual signing; that key needs its own selector, as one DNS name publishes
    one key).

    Signatures use relaxed/relaxed canonicalisation, sign the headers RFC 6376 recommends plus
    List-Unsubscribe-Post, and list From one more time than it occurs so that a From header
    added in transit breaks the signature. Create one signer and reuse it; it is immutable and
    safe to share between threads.
    """

    domain: str
    selector: str
    rsa_key: DKIMKey
    ed25519_key: DKIMKey | None = None
    ed25519_selector: str | None = None
    _domain: bytes = field(init=False, repr=False, compare=False)
    _selector: bytes = field(init=False, repr=False, compare=False)
    _rsa: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)
    _ed25519: tuple[bytes, ed25519.Ed25519PrivateKey] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.rsa_key.private_key, rsa.RSAPrivateKey):
            raise ConfigError(
                "DKIMSigner.rsa_key must be an RSA key (every receiver checks RSA; Ed25519 is "
                "added alongside it): pass the Ed25519 key as ed25519_key"
            )
        setattr_ = object.__setattr__  # the dataclass is frozen; these are derived once here
        setattr_(self, "_domain", _normalise_domain(self.domain).encode("ascii"))
        setattr_(self, "_selector", _normalise_dns_name(self.selector, "selector").encode())
        setattr_(self, "_rsa", self.rsa_key.private_key)
        setattr_(self, "_ed25519", self._prepare_ed25519())

    def _prepare_ed25519(self) -> tuple[bytes, ed25519.Ed25519PrivateKey] | None:
        if self.ed25519_key is None:
            if self.ed25519_selector is not None:
                raise ConfigError("ed25519_selector was given without an ed25519_key")
            return None
        if not isinstance(self.ed25519_key.private_key, ed25519.Ed25519PrivateKey):
            raise ConfigError("DKIMSigner.ed25519_key must be an Ed25519 key")
        if self.ed25519_selector is None:
            raise ConfigError(
                "an Ed25519 key needs its own selector (ed25519_selector=...): one DNS name "
                "can publish only one DKIM key"
            )
        selector = _normalise_dns_name(self.ed25519_selector, "selector").encode()
        if selector == self._selector:
            raise ConfigError("ed25519_selector must differ from the RSA selector")
        return selector, self.ed25519_key.private_key

    def render_dns_records(self) -> tuple[DNSRecord, ...]:
        """The TXT records to publish for this signer's keys (RSA first)."""
        records = [render_dns_record(self.rsa_key, domain=self.domain, selector=self.selector)]
        if self.ed25519_key is not None and self.ed25519_selector is not None:
            records.append(
                render_dns_record(
                    self.ed25519_key, domain=self.domain, selector=self.ed25519_selector
                )
            )
        return tuple(records)

    def sign(self, message: bytes, *, timestamp: float | None = None) -> bytes:
        """Return ``message`` with its DKIM-Signature header(s) prepended (RSA topmost).

        Line endings follow the message's own (CRLF or LF). ``t=`` is ``timestamp`` (seconds
        since the epoch), else now. A message without a From header cannot be signed and
        raises ``dkim.ParameterError``; a header block that is not RFC 5322 raises
        ``dkim.MessageFormatError``.
        """
        headers, body = _split_message(message)
        listed, canonical = _signed_headers(headers)
        when = str(int(time.time() if timestamp is None else timestamp)).encode("ascii")
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        linesep = dkim.util.get_linesep(message)

        def fields(algorithm: bytes, selector: bytes) -> list[tuple[bytes, bytes]]:
            # dkimpy's tags, in dkimpy's order (tests compare the bytes with its own output).
            return [
                (b"v", b"1"),
                (b"a", algorithm),
                (b"c", b"relaxed/relaxed"),
                (b"d", self._domain),
                (b"i", b"@" + self._domain),
                (b"q", b"dns/txt"),
                (b"s", selector),
                (b"t", when),
                (b"h", b" : ".join(listed)),
                (b"bh", body_hash),
            ]

        signatures = [
            _signature_header(
                fields(b"rsa-sha256", self._selector), canonical, self._sign_rsa, linesep
            )
        ]
        if self._ed25519 is not None:
            ed_selector, ed_key = self._ed25519
            # RFC 8463: Ed25519 signs the SHA-256 digest of the header data (PureEdDSA).
            signatures.append(
                _signature_header(
                    fields(b"ed25519-sha256", ed_selector), canonical, ed_key.sign, linesep
                )
            )
        return b"".join(signatures) + message

    def _sign_rsa(self, digest: bytes) -> bytes:
        # RSASSA-PKCS1-v1_5 over SHA-256 (RFC 8301), computed by OpenSSL.
        return self._rsa.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
