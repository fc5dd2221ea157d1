"""C2SP checkpoint bodies are parsed exactly: the tree size is ASCII decimal without leading zeros,
and every malformed body is refused with the module's own NoteError (never a bare ValueError)."""

import base64

import pytest

from cipherfeed.checkpoint import Checkpoint, NoteError, parse_checkpoint

ROOT = base64.b64encode(bytes(range(32))).decode()


def body(size: str, origin: str = "example.com/log", root: str = ROOT) -> str:
    return f"{origin}\n{size}\n{root}\n"


@pytest.mark.parametrize("size", ["0", "1", "12", "18446744073709551615"])
def test_ascii_sizes_parse(size):
    assert parse_checkpoint(body(size)) == Checkpoint("example.com/log", int(size), bytes(range(32)))


@pytest.mark.parametrize(
    "size",
    [
        "\u0661\u0662",  # Arabic-Indic "12": str.isdigit() says yes
        "\u00b2",  # superscript two: isdigit() yes, int() raises ValueError
        "\uff11",  # fullwidth one
        "01", "00", "-1", "+1", " 1", "1 ", "1_000", "", "0x1",
        "18446744073709551616",  # 2**64: beyond a uint64 tree size
        "9" * 5000,  # beyond CPython's int-from-string digit limit
    ],
)  # fmt: skip
def test_anything_else_is_a_note_error(size):
    with pytest.raises(NoteError):
        parse_checkpoint(body(size))


@pytest.mark.parametrize(
    "text",
    [
        body("1", origin=""),
        body("1", root="not base64!"),
        body("1", root=base64.b64encode(bytes(31)).decode()),
        "example.com/log\n1\n",
        body("1").rstrip("\n"),
    ],
)
def test_malformed_bodies_are_note_errors(text):
    with pytest.raises(NoteError):
        parse_checkpoint(text)


def test_a_parsed_checkpoint_writes_back_the_same_body():
    text = body("4096")
    assert parse_checkpoint(text).body() == text
