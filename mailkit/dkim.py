"""DKIM: key generation, the DNS TXT record to publish, and fast signing.

Signing is dkimpy's: its canonicalisation, header selection and DKIM-Signature formatting are
used unchanged. Only the RSA private-key operation is swapped for OpenSSL's (through
``cryptography``), because dkimpy computes it in pure Python (~10 ms for RSA-2048, against well
under 1 ms natively) and a campaign signs every message. Ed25519 signatures (RFC 8463) go
through dkimpy's own path, which is already native (libsodium, via PyNaCl).

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
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import dkim
import dkim.util
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (
    Relaxed,
    compress_whitespace,
    correct_empty_body,
    strip_trailing_lines,
    strip_trailing_whitespace,
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

_RELAXED = (b"relaxed", b"relaxed")
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


class _RSASignature:
    """What dkimpy's signing step expects back from ``pk.sign(digest)``."""

    __slots__ = ("signature",)

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _OpenSSLRSAKey:
    """An RSA key with the ``sign(digest)`` shape that dkimpy uses for Ed25519 keys."""

    __slots__ = ("_key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _RSASignature:
        # RSASSA-PKCS1-v1_5 over SHA-256 is deterministic: the same bytes dkimpy would compute.
        return _RSASignature(self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))


# dkimpy parses the PEM key it is given on every signature, in pure Python (~0.1 ms for
# RSA-2048), although the native path below never uses what it parsed. It gets this placeholder
# instead: a well-formed PKCS#1 RSAPrivateKey whose nine integers are all zero. It parses in
# microseconds, and were it ever to reach dkimpy's own RSA code it could sign nothing (a zero
# modulus is refused as too small for the digest).
_UNUSED_RSA_PEM = (
    b"-----BEGIN RSA PRIVATE KEY-----\n"
    + base64.b64encode(bytes([0x30, 27]) + bytes([0x02, 0x01, 0x00]) * 9)
    + b"\n-----END RSA PRIVATE KEY-----\n"
)


class _OpenSSLDKIM(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type information
    """dkimpy's DKIM with the RSA private-key operation done by OpenSSL.

    Everything but one step is dkimpy's: ``DKIM.sign`` builds the tag list and calls
    ``gen_header``, which hashes the canonical headers, signs, and folds the header. In
    ``gen_header`` the RSA branch calls dkimpy's pure-Python ``RSASSA_PKCS1_v1_5_sign`` (a
    module function, so not overridable without patching dkimpy process-wide), while the
    Ed25519 branch calls ``pk.sign(sha256_digest).signature``. For RSA this override runs
    ``gen_header`` down the second branch with a key object that answers ``sign`` with the
    PKCS#1 v1.5 signature of that digest. The tags (``a=rsa-sha256``) and the hash function were
    fixed by ``sign`` before ``gen_header`` runs, so the header is exactly dkimpy's; the tests
    check it is byte-identical to dkimpy's pure-Python result.

    Three cheaper equivalents save per-message work whose result dkimpy would not use or
    could not change: the key dkimpy parses is a placeholder (``_UNUSED_RSA_PEM``); a CRLF
    message's body is sliced rather than split into lines and joined again (``set_message``;
    dkimpy still parses the headers); and the body hash is computed by ``_body_hash`` with
    dkimpy's own canonicalisation functions applied only to the lines they can change (dkimpy
    itself is handed an empty body, and the ``bh=`` tag it computed from it is replaced in
    ``gen_header`` before anything is hashed or signed).
    """

    signature_algorithm: bytes
    body: bytes
    _body: bytes
    _body_hashes: dict[tuple[Any, Any], bytes]

    def __init__(self, message: bytes, *, rsa_key: rsa.RSAPrivateKey, linesep: bytes) -> None:
        super().__init__(message, linesep=linesep)
        self.should_sign.update(EXTRA_SIGNED_HEADERS)
        self._native_rsa = _OpenSSLRSAKey(rsa_key)

    def set_message(self, message: bytes | None) -> None:
        # dkimpy splits the whole message into lines and joins the body's lines again with
        # CRLF. When every line end is CRLF, that body is the bytes after the first empty line,
        # unchanged: dkimpy then parses only the header block, and the body is sliced off.
        if message and not message.startswith(b"\r\n"):
            end = message.find(b"\r\n\r\n")
            if end >= 0 and message.count(b"\n") == message.count(b"\r\n"):
                super().set_message(message[: end + 4])
                body = message[end + 4 :]
            else:
                super().set_message(message)
                body = self.body
        else:
            super().set_message(message)
            body = self.body
        self._body = body
        self._body_hashes = {}
        # dkimpy's sign() canonicalises and hashes self.body for bh= with two regular
        # expression passes over the whole body; gen_header puts the real hash in instead.
        self.body = b""

    def gen_header(
        self,
        fields: Any,
        include_headers: Any,
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        if self.signature_algorithm == b"rsa-sha1":
            # Would reach dkimpy's RSA code with the placeholder key; DKIMSigner never asks.
            raise dkim.ParameterError("rsa-sha1 is not supported (RFC 8301)")
        if any(name == b"l" for name, _ in fields):
            raise dkim.ParameterError("l= (body length) signing is not supported")
        bh = self._body_hash(canon_policy)
        fields = [(name, bh if name == b"bh" else value) for name, value in fields]
        if self.signature_algorithm != b"rsa-sha256":
            header: bytes = super().gen_header(
                fields, include_headers, canon_policy, header_name, pk, standardize
            )
            return header
        self.signature_algorithm = b"ed25519-sha256"
        try:
            header = super().gen_header(
                fields, include_headers, canon_policy, header_name, self._native_rsa, standardize
            )
        finally:
            self.signature_algorithm = b"rsa-sha256"
        return header

    def _body_hash(self, canon_policy: Any) -> bytes:
        key = (canon_policy.body_algorithm, self.hasher)
        known = self._body_hashes.get(key)
        if known is None:
            if canon_policy.body_algorithm is Relaxed:
                canonical = _relaxed_body(self._body)
            else:
                canonical = canon_policy.canonicalize_body(self._body)
            known = base64.b64encode(self.hasher(canonical).digest())
            self._body_hashes[key] = known
        return known


#: Above this share of spaces and tabs, one pass of dkimpy's canonicalisation over the whole
#: body is cheaper than one per line that has them.
_WSP_DENSE = 1 / 64


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation (RFC 6376 3.4.4), computed with its own functions
    but only over the lines they can change.

    Its first two steps (``strip_trailing_whitespace``, ``compress_whitespace``) touch spaces
    and tabs only, and never across a line break. A base64 body part has neither, so on a
    typical campaign message only the MIME part headers and boundaries need them; the rest is
    copied. ``strip_trailing_lines`` and ``correct_empty_body`` then run on the whole as in
    dkimpy. Tests compare the result with dkimpy's on varied bodies.
    """
    spaces, tabs = body.count(b" "), body.count(b"\t")
    if spaces + tabs > len(body) * _WSP_DENSE:
        return Relaxed.canonicalize_body(body)  # type: ignore[no-any-return]
    pieces: list[bytes] = []
    done = 0
    while True:
        hits = [i for i in (body.find(b" ", done), body.find(b"\t", done)) if i >= 0]
        if not hits:
            break
        start = body.rfind(b"\n", done, min(hits)) + 1 or done
        end = body.find(b"\n", min(hits))
        end = len(body) if end < 0 else end + 1
        pieces.append(body[done:start])
        pieces.append(compress_whitespace(strip_trailing_whitespace(body[start:end])))
        done = end
    pieces.append(body[done:])
    return correct_empty_body(strip_trailing_lines(b"".join(pieces)))  # type: ignore[no-any-return]


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
    _ed25519: tuple[bytes, bytes] | None = field(init=False, repr=False, compare=False)

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

    def _prepare_ed25519(self) -> tuple[bytes, bytes] | None:
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
        if importlib.util.find_spec("nacl") is None:
            raise ConfigError("Ed25519 DKIM signing needs PyNaCl: pip install pynacl")
        seed = self.ed25519_key.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return selector, base64.b64encode(seed)

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

    def sign(self, message: bytes) -> bytes:
        """Return ``message`` with its DKIM-Signature header(s) prepended (RSA topmost).

        Line endings follow the message's own (CRLF or LF). A message without a From header
        cannot be signed and raises ``dkim.ParameterError``.
        """
        signer = _OpenSSLDKIM(message, rsa_key=self._rsa, linesep=dkim.util.get_linesep(message))
        headers: list[bytes] = [
            signer.sign(
                self._selector,
                self._domain,
                _UNUSED_RSA_PEM,
                signature_algorithm=b"rsa-sha256",
                canonicalize=_RELAXED,
            )
        ]
        if self._ed25519 is not None:
            ed_selector, ed_seed = self._ed25519
            headers.append(
                signer.sign(
                    ed_selector,
                    self._domain,
                    ed_seed,
                    signature_algorithm=b"ed25519-sha256",
                    canonicalize=_RELAXED,
                )
            )
        return b"".join(headers) + message
