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
        cheap = _cheap(f)  # small items for a long list, so that a request stays small
        return st.one_of([st.lists(item if n < 100 else cheap, min_size=n, max_size=n) for n in (0, 1, 2, 5, 1001)])

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


def _cheap(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Items for very long repeated fields: small values, so a request stays small."""
    if f.type in _INT_RANGES:
        lo, hi = _INT_RANGES[f.type]
        return st.integers(max(lo, 0), min(hi, 10**6))
    if f.type == F.TYPE_STRING:
        return st.text(max_size=4)
    if f.type == F.TYPE_BYTES:
        return st.binary(max_size=4)
    if f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32)
    return st.booleans()


def _set(msg: Message, f: FieldDescriptor, v: Any) -> None:
    if f.type == F.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(v)
    else:
        setattr(msg, f.name, v)


def _class_of(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@dataclass
class Outcome:
    sent: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # INTERNAL / UNKNOWN answers, with the request's size
    health_checks: int = 0
    peak_rss_growth: int = 0


@dataclass
class Campaign:
    """Sends fuzzed requests to one RPC; checks each answer, and the service after every 100."""

    call: Callable[..., Any]
    healthy: Callable[[], bool]  # a valid request, answered right
    rss: Callable[[], int]
    rss_limit: int  # bytes above the RSS at the start that fail the campaign
    timeout: float = 30.0
    outcome: Outcome = field(default_factory=Outcome)
    _rss0: int = 0

    def __post_init__(self) -> None:
        self._rss0 = self.rss()

    def send(self, request: Message) -> None:
        o = self.outcome
        try:
            self.call(request, timeout=self.timeout)
            o.codes["OK"] += 1
        except grpc.RpcError as exc:
            code = exc.code()
            o.codes[code.name] += 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                o.bad.append(f"{code.name} for a {request.ByteSize()}-byte {type(request).__name__}: {exc.details()}")
        o.sent += 1
        if o.sent % 100 == 0:
            self.check()

    def check(self) -> None:
        o = self.outcome
        o.health_checks += 1
        if not self.healthy():
            o.bad.append(f"a valid request failed after {o.sent} inputs")
        growth = self.rss() - self._rss0
        o.peak_rss_growth = max(o.peak_rss_growth, growth)
        if growth > self.rss_limit:
            o.bad.append(f"RSS grew by {growth >> 20} MiB after {o.sent} inputs")
