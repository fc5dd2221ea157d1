"""A protocol fuzzer: hypothesis strategies built from the proto descriptors, sent to live servers.

``message_strategy(descriptor)`` walks a message's fields: integers including each type's
extremes, strings including huge and non-ASCII ones, bytes including mutations of valid values
the caller supplies (e.g. a real query ciphertext with bytes flipped, cut or padded), repeated
fields, nested messages and at most one member of each oneof. ``Campaign`` sends such requests to
one RPC and checks every answer: never INTERNAL or UNKNOWN, the server's memory bounded, and a
valid request still answered right after every 100 inputs.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
HUGE = 1 << 20  # a 1 MiB string or bytes field: above every field's own limit, below the message limit
# Made once, like every strategy below: strategies built inside a draw, each around a fresh 1 MiB
# value, stayed alive while hypothesis ran (105 of them after 200 UploadHistory inputs; 3 GiB over
# 10,000), and that memory was the fuzzer's, not the servers' it shares a process with.
_HUGE_BYTES = bytes(HUGE)
_HUGE_TEXT = "a" * HUGE

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Any value of the type, its extremes, and small values near the mesh's limits (1,000 items, ...)."""
    extremes = [
        v for v in (lo, hi, 0, 1, -1, hi // 2 + 1, 1000, 1001, 2**31 - 1, 2**32 - 1, 2**63 - 1) if lo <= v <= hi
    ]
    return st.one_of(st.sampled_from(extremes), st.integers(lo, hi), st.integers(max(lo, -1), min(hi, 1100)))


def _strings(valid: Sequence[str]) -> st.SearchStrategy[str]:
    options: list[st.SearchStrategy[str]] = [
        st.text(max_size=80),
        st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70),
        st.sampled_from(["", _HUGE_TEXT, "é" * 70, "\u202e" * 64, "0" * 64, "ff" * 32, "../" * 30, "\x00" * 64]),
    ]
    if valid:
        options.append(st.sampled_from(list(valid)))
    return st.one_of(options)


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with a few bytes XORed, cut short, or padded."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        kind = draw(st.sampled_from(["flip", "flip", "cut", "pad"]))
        if kind == "cut":
            return bytes(data[: draw(st.integers(0, len(data)))])
        if kind == "pad":
            return bytes(data) + draw(st.binary(min_size=1, max_size=64))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)

    return mutate()


def _bytes(valid: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    options: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=100),
        st.sampled_from([b"", bytes(32), b"\xff" * 32, _HUGE_BYTES]),
    ]
    for v in valid:
        options += [st.just(v), _mutated(v)] if v else [st.just(v)]
    return st.one_of(options)


@dataclass
class Seeds:
    """Valid values by field name (``key_id``, ``query_ciphertext``, ...), used as is and mutated."""

    strings: Mapping[str, Sequence[str]] = field(default_factory=dict)
    blobs: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    messages: Mapping[str, Sequence[Message]] = field(default_factory=dict)  # by full message name
    counts: Mapping[str, int] = field(default_factory=dict)  # a repeated field's valid length, also drawn


def _scalar(f: FieldDescriptor, seeds: Seeds) -> st.SearchStrategy[Any]:
    if f.type in _INT_RANGES:
        return _integers(*_INT_RANGES[f.type])
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32 if f.type == F.TYPE_FLOAT else 64)
    if f.type == F.TYPE_STRING:
        return _strings(seeds.strings.get(f.name, ()))
    if f.type == F.TYPE_BYTES:
        return _bytes(seeds.blobs.get(f.name, ()))
    if f.type == F.TYPE_ENUM:
        assert f.enum_type is not None
        numbers = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field type {f.type}")


def message_strategy(
    descriptor: Descriptor, cls: type[Message], seeds: Seeds, depth: int = 3
) -> st.SearchStrategy[Message]:
    """Messages of ``cls``: each field absent or drawn from its type's strategy; one member per oneof."""

    def value(f: FieldDescriptor) -> st.SearchStrategy[Any]:
        if f.type == F.TYPE_MESSAGE:
            sub = f.message_type
            assert sub is not None
            sub_cls = _class_of(sub)
            made = message_strategy(sub, sub_cls, seeds, depth - 1) if depth > 0 else st.just(sub_cls())
            valid = seeds.messages.get(sub.full_name, ())
            return st.one_of(made, st.sampled_from(list(valid))) if valid else made
        return _scalar(f, seeds)

    def repeated(f: FieldDescriptor) -> st.SearchStrategy[list[Any]]:
        item = value(f)
        if f.type == F.TYPE_MESSAGE:
            return st.one_of([st.lists(item, min_size=n, max_size=n) for n in range(4)])
        lengths = sorted({0, 1, 2, 5, seeds.counts.get(f.name, 0)})
        # and a list of 1,001 small items, so that a request stays small
        return st.one_of([*(st.lists(item, min_size=n, max_size=n) for n in lengths), _long_list(f, 1001)])

    # Every strategy is built here, once, and only drawn from below (see _HUGE_BYTES).
    plain = [(f, repeated(f) if f.is_repeated else value(f)) for f in descriptor.fields if f.containing_oneof is None]
    oneofs = [st.sampled_from([None, *((f, value(f)) for f in oneof.fields)]) for oneof in descriptor.oneofs]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for f, strategy in plain:
            if not draw(st.booleans()):
                continue
            if f.is_repeated:
                items = draw(strategy)
                if f.type == F.TYPE_MESSAGE:
                    for item in items:
                        getattr(msg, f.name).add().CopyFrom(item)
                else:
                    getattr(msg, f.name).extend(items)
            else:
                _set(msg, f, draw(strategy))
        for oneof in oneofs:
            choice = draw(oneof)
            if choice is not None:
                _set(msg, choice[0], draw(choice[1]))
        return msg

    return build()


def _long_list(f: FieldDescriptor, n: int) -> st.SearchStrategy[list[Any]]:
    """``n`` small items for a very long repeated field, made from one drawn seed: drawing 1,001
    items one by one through hypothesis took ~60 ms a list, most of the fuzzer's time."""
    if f.type in _INT_RANGES:
        lo, hi = _INT_RANGES[f.type]
        lo, hi = max(lo, 0), min(hi, 10**6)

        def make(r: random.Random) -> list[Any]:
            return [r.randint(lo, hi) for _ in range(n)]
    elif f.type == F.TYPE_STRING:

        def make(r: random.Random) -> list[Any]:
            return ["".join(chr(r.randint(32, 0x2FF)) for _ in range(r.randint(0, 4))) for _ in range(n)]
    elif f.type == F.TYPE_BYTES:

        def make(r: random.Random) -> list[Any]:
            return [r.randbytes(r.randint(0, 4)) for _ in range(n)]
    elif f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):

        def make(r: random.Random) -> list[Any]:
            return [r.uniform(-1e6, 1e6) for _ in range(n)]
    elif f.type == F.TYPE_ENUM:
        assert f.enum_type is not None
        numbers = [v.number for v in f.enum_type.values]

        def make(r: random.Random) -> list[Any]:
            return [r.choice(numbers) for _ in range(n)]
    else:

        def make(r: random.Random) -> list[Any]:
            return [r.random() < 0.5 for _ in range(n)]

    return st.integers(0, 2**32 - 1).map(lambda s: make(random.Random(s)))


def _set(msg: Message, f: FieldDescriptor, v: Any) -> None:
    if f.type == F.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(v)
    else:
        setattr(msg, f.name, v)


def _class_of(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def request_bytes(
    descriptor: Descriptor, cls: type[Message], seeds: Seeds, sign: Callable[[Message], None] | None = None
) -> st.SearchStrategy[bytes]:
    """What goes on the wire for one RPC: mostly a fuzzed message, serialized; also such a
    serialization with bytes flipped, cut or padded (unknown fields, broken tags and lengths) and
    bytes that are no protobuf at all, so that an RPC without fields gets more than one input.
    ``sign``, when given, sets a valid owner authorization on a third of the messages (before
    serializing), so that requests get past the owner check to the handler's own validation."""
    messages = message_strategy(descriptor, cls, seeds)

    @st.composite
    def draw(draw: st.DrawFn) -> bytes:
        kind = draw(st.sampled_from(["message"] * 6 + ["mangled", "mangled", "raw"]))
        if kind == "raw":
            return draw(_RAW)
        msg = draw(messages)
        if sign is not None and draw(st.integers(0, 2)) == 0:
            sign(msg)
        data = msg.SerializeToString()
        if kind == "mangled":
            return draw(_mangled(data))
        return data

    return draw()


_RAW = st.one_of(st.binary(max_size=200), st.sampled_from([b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 11]))


@st.composite
def _mangled(draw: st.DrawFn, data: bytes) -> bytes:
    if not data:
        return draw(st.binary(min_size=1, max_size=16))
    out = bytearray(data)
    kind = draw(st.sampled_from(["flip", "cut", "pad"]))
    if kind == "cut":
        return bytes(out[: draw(st.integers(0, len(out) - 1))])
    if kind == "pad":
        return bytes(out) + draw(st.binary(min_size=1, max_size=32))
    for _ in range(draw(st.integers(1, 4))):
        out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
    return bytes(out)


@dataclass
class Outcome:
    sent: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # the first findings: INTERNAL / UNKNOWN, failed checks, ...
    findings: int = 0  # all of them
    health_checks: int = 0
    health_failures: int = 0
    rss_start: dict[str, int] = field(default_factory=dict)  # per server, bytes
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # sending and checking, not drawing
    check_seconds: float = 0.0
    wall_seconds: float = 0.0  # drawing included

    def finding(self, what: str) -> None:
        self.findings += 1
        if len(self.bad) < 50:
            self.bad.append(what)

    def peak_growth(self) -> dict[str, int]:
        return {name: self.rss_peak.get(name, 0) - start for name, start in self.rss_start.items()}


@dataclass
class Campaign:
    """Sends fuzzed requests to one RPC; checks each answer, and every server after every 100.

    ``rss`` gives each server's resident set (a process of its own, so the fuzzer's memory is not
    counted); a server whose RSS grows by more than ``rss_limit`` over the campaign fails it, and so
    does one that ``exited`` reports."""

    call: Callable[..., Any]
    checks: Mapping[str, Callable[[], bool]]  # per server: a valid request, answered right
    rss: Callable[[], dict[str, int]]
    rss_limit: int
    exited: Callable[[], dict[str, int]] = dict
    timeout: float = 30.0
    check_every: int = 100
    outcome: Outcome = field(default_factory=Outcome)

    def __post_init__(self) -> None:
        o = self.outcome
        if not o.rss_start:
            o.rss_start = self.rss()
            o.rss_peak = dict(o.rss_start)

    def send(self, request: Message | bytes) -> None:
        o = self.outcome
        t0 = time.perf_counter()
        try:
            self.call(request, timeout=self.timeout)
            o.codes["OK"] += 1
        except grpc.RpcError as exc:
            code = exc.code()
            o.codes[code.name] += 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                size = len(request) if isinstance(request, bytes) else request.ByteSize()
                o.finding(f"{code.name} for a {size}-byte request: {exc.details()}")
        o.sent += 1
        o.seconds += time.perf_counter() - t0
        if o.sent % 10 == 0:
            self._sample()
        if o.sent % self.check_every == 0:
            self.check()

    def _sample(self) -> None:
        o = self.outcome
        now = self.rss()
        for name, value in now.items():
            o.rss_peak[name] = max(o.rss_peak.get(name, 0), value)
        o.rss_end = now

    def check(self) -> None:
        o = self.outcome
        t0 = time.perf_counter()
        dead = self.exited()
        if dead:
            o.finding(f"after {o.sent} inputs servers exited: {dead}")
        o.health_checks += 1
        for name, healthy in self.checks.items():
            if name in dead:
                continue
            try:
                ok = healthy()
            except grpc.RpcError as exc:
                ok, why = False, f"{exc.code().name}: {exc.details()}"
            else:
                why = "wrong answer"
            if not ok:
                o.health_failures += 1
                o.finding(f"a valid {name} request failed after {o.sent} inputs ({why})")
        self._sample()
        for name, growth in o.peak_growth().items():
            if growth > self.rss_limit:
                o.finding(f"{name}'s RSS grew by {growth >> 20} MiB after {o.sent} inputs")
        o.check_seconds += time.perf_counter() - t0
        o.seconds += time.perf_counter() - t0
