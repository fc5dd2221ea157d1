"""The EIP-4361 message builder and parser on their own: canonical round trips and strict refusals."""

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from cipherfeed import siwe

ADDRESS = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"  # EIP-55 checksummed

# The example of EIP-4361, every optional field present.
FULL = (
    "service.org wants you to sign in with your Ethereum account:\n"
    f"{ADDRESS}\n"
    "\n"
    "I accept the ServiceOrg Terms of Service: https://service.org/tos\n"
    "\n"
    "URI: https://service.org/login\n"
    "Version: 1\n"
    "Chain ID: 1\n"
    "Nonce: 32891756\n"
    "Issued At: 2021-09-30T16:25:24Z\n"
    "Expiration Time: 2021-10-30T16:25:24.000Z\n"
    "Not Before: 2021-09-30T16:25:24+02:00\n"
    "Request ID: some-id\n"
    "Resources:\n"
    "- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/\n"
    "- https://example.com/my-web2-claim.json"
)


def test_the_eip_example_parses_and_rebuilds_byte_for_byte():
    message = siwe.parse(FULL)
    assert message.domain == "service.org" and message.address == ADDRESS and message.chain_id == 1
    assert message.nonce == "32891756" and message.request_id == "some-id" and len(message.resources) == 2
    assert message.expires is not None and message.expires.year == 2021
    assert message.text() == FULL


def test_a_message_without_statement_or_optional_fields():
    message = siwe.SiweMessage(
        domain="localhost:8080", address=ADDRESS, uri="http://localhost:8080", chain_id=31337,
        nonce="abcdefgh", issued_at="2026-12-01T00:00:00Z",
    )  # fmt: skip
    text = message.text()
    assert "\n\n\nURI: " in text  # the statement's line is absent, both blank lines stay
    assert siwe.parse(text) == message


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda t: t.replace(ADDRESS, ADDRESS.lower()), "EIP-55"),
        (lambda t: t.replace("Version: 1", "Version: 2"), "version"),
        (lambda t: t.replace("Chain ID: 1", "Chain ID: 01"), "Chain ID"),
        (lambda t: t.replace("Nonce: 32891756", "Nonce: 1234"), "nonce"),
        (lambda t: t.replace("Nonce: 32891756", "Nonce: 3289-1756"), "nonce"),
        (lambda t: t.replace("2021-09-30T16:25:24Z", "yesterday"), "RFC 3339"),
        (lambda t: t.replace("2021-09-30T16:25:24Z", "2021-13-30T16:25:24Z"), "valid"),
        (lambda t: t.replace("\nVersion", "\nversion"), "Version"),
        (lambda t: t.replace("URI: https://service.org/login", "URI: not a uri"), "URI"),
        (lambda t: t.replace(" wants you", " want you"), "line 1"),
        (lambda t: t + "\n", "unexpected"),
        (lambda t: t + "\nExtra: field", "unexpected"),
        (lambda t: t.replace("\n", "\r\n"), "LF"),
        (lambda t: t.replace("Request ID: some-id\n", "").replace("Not Before", "Request ID: x\nNot Before"), "line"),
        (lambda t: "x" * 5000, "longer"),
    ],
)
def test_anything_off_the_grammar_is_refused(change, why):
    with pytest.raises(siwe.SiweError, match=why):
        siwe.parse(change(FULL))


def test_recovery_binds_the_message_to_its_address():
    account = Account.create()
    text = FULL.replace(ADDRESS, account.address)
    signature = bytes(account.sign_message(encode_defunct(text=text)).signature)
    assert siwe.verified(text, signature).address == account.address
    with pytest.raises(siwe.SiweError, match="not by"):
        siwe.verified(FULL, signature)  # the same signature over the message naming someone else
    with pytest.raises(siwe.SiweError, match="65 bytes"):
        siwe.verified(text, signature[:64])
