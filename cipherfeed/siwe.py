"""Sign-In with Ethereum (EIP-4361) messages: a strict builder and parser, and EIP-191 recovery.

Written here rather than taken from PyPI ``siwe`` (which pins web3<8). The parser accepts exactly
the grammar of EIP-4361 (version 1) and nothing else: every line in its place, an EIP-55
checksummed address, an alphanumeric nonce of at least 8 characters, RFC 3339 times. Policy
(which domain, chain and nonce are acceptable) is the caller's; see ``KeyServiceCore.sign_in``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address

PREAMBLE = " wants you to sign in with your Ethereum account:"
MAX_MESSAGE_CHARS = 4096

# RFC 3986 authority (host[:port], optional userinfo) with an optional scheme, as EIP-4361 allows.
_DOMAIN = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://)?(?:[A-Za-z0-9._~%!$&'()*+,;=:-]+@)?[A-Za-z0-9.-]+(?::\d{1,5})?$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")
_NONCE = re.compile(r"^[A-Za-z0-9]{8,128}$")
_STATEMENT = re.compile(r"^[^\n\r]+$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})$")
_REQUEST_ID = re.compile(r"^[^\n\r]*$")


class SiweError(ValueError):
    """The message does not follow EIP-4361, or its signature does not recover to its address."""


@dataclass(frozen=True)
class SiweMessage:
    domain: str
    address: str
    uri: str
    chain_id: int
    nonce: str
    issued_at: str  # RFC 3339, kept as written: the signature is over these characters
    statement: str | None = None
    version: str = "1"
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(_DOMAIN.match(self.domain) is not None, "domain is not an RFC 3986 authority")
        _check(is_checksum_address(self.address), "address is not an EIP-55 checksummed address")
        _check(self.statement is None or _STATEMENT.match(self.statement) is not None, "statement has a line break")
        _check(_URI.match(self.uri) is not None, "URI is not an RFC 3986 URI")
        _check(self.version == "1", "version must be 1")
        _check(self.chain_id >= 1, "chain id must be positive")
        _check(_NONCE.match(self.nonce) is not None, "nonce must be 8+ alphanumeric characters")
        _check(self.request_id is None or _REQUEST_ID.match(self.request_id) is not None, "request id is one line")
        for r in self.resources:
            _check(_URI.match(r) is not None, f"resource {r!r} is not a URI")
        for t in (self.issued_at, self.expiration_time, self.not_before):
            if t is not None:
                parse_time(t)

    @property
    def issued(self) -> datetime:
        return parse_time(self.issued_at)

    @property
    def expires(self) -> datetime | None:
        return parse_time(self.expiration_time) if self.expiration_time is not None else None

    @property
    def valid_from(self) -> datetime | None:
        return parse_time(self.not_before) if self.not_before is not None else None

    def text(self) -> str:
        """The message exactly as the wallet shows and signs it."""
        lines = [self.domain + PREAMBLE, self.address, ""]
        if self.statement is not None:
            lines.append(self.statement)
        lines += [
            "",
            f"URI: {self.uri}",
            f"Version: {self.version}",
            f"Chain ID: {self.chain_id}",
            f"Nonce: {self.nonce}",
            f"Issued At: {self.issued_at}",
        ]
        if self.expiration_time is not None:
            lines.append(f"Expiration Time: {self.expiration_time}")
        if self.not_before is not None:
            lines.append(f"Not Before: {self.not_before}")
        if self.request_id is not None:
            lines.append(f"Request ID: {self.request_id}")
        if self.resources:
            lines.append("Resources:")
            lines += [f"- {r}" for r in self.resources]
        return "\n".join(lines)


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise SiweError(why)


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC, to the second (what the builder writes)."""
    text = t.astimezone(timezone.utc).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    _check(_TIME.match(text) is not None, f"{text!r} is not an RFC 3339 date-time")
    try:
        # Python 3.10's fromisoformat takes at most 6 fractional digits.
        head, dot, rest = text.partition(".")
        if dot:
            digits = re.match(r"\d+", rest)
            assert digits is not None
            text = head + "." + digits.group()[:6].ljust(6, "0") + rest[digits.end() :]
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SiweError(f"{text!r} is not a valid date-time") from exc


def parse(text: str) -> SiweMessage:
    """The message, or SiweError naming the first line that breaks the grammar."""
    _check(len(text) <= MAX_MESSAGE_CHARS, f"message is longer than {MAX_MESSAGE_CHARS} characters")
    _check("\r" not in text, "lines end in LF only")
    lines = text.split("\n")
    pos = 0

    def take(prefix: str, optional: bool = False) -> str | None:
        nonlocal pos
        if pos < len(lines) and lines[pos].startswith(prefix):
            pos += 1
            return lines[pos - 1][len(prefix) :]
        _check(optional, f"line {pos + 1}: expected {prefix.strip()!r}")
        return None

    _check(lines[0].endswith(PREAMBLE), "line 1: expected '<domain> wants you to sign in with your Ethereum account:'")
    domain = lines[0][: -len(PREAMBLE)]
    _check(len(lines) > 3, "message is truncated")
    address = lines[1]
    _check(_ADDRESS.match(address) is not None, "line 2: expected a 0x address")
    _check(lines[2] == "", "line 3: expected an empty line")
    pos = 3
    statement = None
    if lines[pos] != "":
        statement = lines[pos]
        pos += 1
    _check(pos < len(lines) and lines[pos] == "", f"line {pos + 1}: expected an empty line")
    pos += 1
    uri = take("URI: ")
    version = take("Version: ")
    chain = take("Chain ID: ")
    _check(chain is not None and chain.isdigit() and not chain.startswith("0"), "Chain ID must be a decimal number")
    nonce = take("Nonce: ")
    issued = take("Issued At: ")
    expiration = take("Expiration Time: ", optional=True)
    not_before = take("Not Before: ", optional=True)
    request_id = take("Request ID: ", optional=True)
    resources: list[str] = []
    if take("Resources:", optional=True) is not None:
        _check(lines[pos - 1] == "Resources:", f"line {pos}: expected 'Resources:'")
        while pos < len(lines) and lines[pos].startswith("- "):
            resources.append(lines[pos][2:])
            pos += 1
    _check(pos == len(lines), f"line {pos + 1}: unexpected text after the message")
    assert uri is not None and version is not None and nonce is not None and issued is not None and chain
    message = SiweMessage(
        domain=domain,
        address=address,
        statement=statement,
        uri=uri,
        version=version,
        chain_id=int(chain),
        nonce=nonce,
        issued_at=issued,
        expiration_time=expiration,
        not_before=not_before,
        request_id=request_id,
        resources=tuple(resources),
    )
    _check(message.text() == text, "message is not in canonical EIP-4361 form")
    return message


def recover(text: str, signature: bytes) -> str:
    """The checksummed address whose EIP-191 personal_sign signature this is."""
    _check(len(signature) == 65, "signature must be 65 bytes")
    try:
        return Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception as exc:  # eth-account raises several types for malformed signatures
        raise SiweError("signature does not recover to an address") from exc


def verified(text: str, signature: bytes) -> SiweMessage:
    """The parsed message if ``signature`` is its address's; SiweError otherwise."""
    message = parse(text)
    if recover(text, signature) != message.address:
        raise SiweError("signature is not by the message's address")
    return message
