"""The device's checks of the score ciphertexts a recommender sends back, before OpenFHE sees them.

A broken or hostile server must not be able to crash, hang or exhaust the device, so score
ciphertexts get what the server gives untrusted material (``cipherfeed.he.codec``): every byte
outside the coefficient words must equal the mesh's own serialization of a score ciphertext of that
layout, every coefficient word must be below its limb's modulus, there are no trailing bytes, and
only then does ``DeserializeCiphertextString`` run.

A score ciphertext is not a fresh encryption (a fresh level-1 encryption serializes with other
metadata), so the references are made here, on the device, under a throwaway key pair, by the
operations the recommender's scorer ends with (``services/recommender/scoring.py``), which fix the
layout: only coefficients and the key tag differ from the scorer's output.

* one group (every block of the ``flat`` strategy, a folded last block): the product of the lifted,
  rescaled query and a level-1 plaintext;
* Horner-joined (``bsgs`` blocks of two or more groups): a rotation by ``baby_steps`` of group
  sums that were loaded from their serialization and added to a zero this context made.

The tests hold every layout the real scorer writes (both kernels, both strategies, inline and
history queries, folded tails) to these templates. The key tag is the one the recommender files the
client's rotation keys under, ``<key id>:<version>`` (``keymap.installed_tag``), so the tag slot must
hold exactly that; its length shifts the layout, so templates are learned per tag length (one or
two per device: key versions below 10 share one), once per process for each parameter set.

After deserializing, the context fingerprint, element count, level, scale degree and slot count
are checked again, as a second line.
"""

from __future__ import annotations

import secrets
import threading

import numpy as np
import openfhe

from cipherfeed.he import globalkeys, wire
from cipherfeed.he.codec import KindTemplates, MaterialCodec, MaterialError, ReferenceMaker, learn_templates, serialize
from cipherfeed.he.params import HEParams, context_fingerprint

WHAT = "score ciphertext"
MAX_TAG_LENGTH = 96  # a 64-hex key id, ':' and a uint32 version need 75
SCORE_LEVEL = 1  # scores live on q0 alone
LIFT = 1 << 31  # any integer: it changes coefficients only (the scorer's QUERY_LIFT_BITS)


def score_layouts(codec: MaterialCodec, tag: str) -> tuple[openfhe.PrivateKey, list[bytes]]:
    """A fresh key pair's secret key and score ciphertexts under it in each layout the scorer
    writes (one group; Horner-joined from the fewest and the most groups), carrying ``tag`` as
    the recommender's do."""
    cc, params = codec.cc, codec.params
    kp = cc.KeyGen()
    # Only the Horner join's rotation is needed; the keys are filed under the query's tag, as the
    # recommender files a client's keys, and dropped again.
    keys = globalkeys.generate_serialized(cc, kp.secretKey, [params.baby_steps], kp.publicKey.GetKeyTag())
    generation = globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys, openfhe.BINARY), tag)
    rng = np.random.default_rng()
    zeros = np.zeros(params.slots, dtype=np.complex128)
    try:
        with globalkeys.EVAL_KEY_LOCK.read():
            # The query as the recommender loads it (codec.load_query), then re-tagged.
            query = codec.load_query(serialize(cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(zeros))))
            query.SetKeyTag(tag)
            low = cc.Rescale(cc.EvalMultNoCheck(query, LIFT))
            prior = cc.MakeCKKSPackedPlaintext(rng.random(params.slots) + 0j, 1, SCORE_LEVEL, None, params.slots)
            product = cc.EvalMult(low, prior)  # random words: every coefficient differs between key pairs
            one_group = serialize(product)
            zero = cc.EvalSub(product, product)
            out = [one_group]
            for groups in (2, params.giant_steps):
                loaded = [
                    cc.EvalAdd(zero, openfhe.DeserializeCiphertextString(one_group, openfhe.BINARY))
                    for _ in range(groups - 1)
                ]
                total = loaded[-1]
                for partial in reversed(loaded[:-1]):
                    total = cc.EvalRotate(total, params.baby_steps)
                    cc.EvalAddInPlace(total, partial)
                out.append(serialize(cc.EvalRotate(total, params.baby_steps)))
    finally:
        globalkeys.drop(cc, tag, generation)
    return kp.secretKey, out


def score_references(codec: MaterialCodec, tag_length: int) -> ReferenceMaker:
    """``score_layouts`` under a fresh key pair and a random tag of ``tag_length`` characters."""

    def make() -> list[tuple[bytes, str]]:
        tag = secrets.token_hex(tag_length)[:tag_length]
        return [(blob, tag) for blob in score_layouts(codec, tag)[1]]

    return make


class ScoreChecker:
    """Validating loader of score ciphertexts for one parameter set (``for_params`` shares one per
    process); templates are learned on first use of each tag length."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        self.codec = MaterialCodec(params)
        self.fingerprint = self.codec.fingerprint
        self._lock = threading.Lock()
        self._templates: dict[int, KindTemplates] = {}  # per tag length

    def templates(self, tag_length: int) -> KindTemplates:
        if not 0 < tag_length <= MAX_TAG_LENGTH:
            raise MaterialError(f"a {WHAT} key tag of {tag_length} characters is not the mesh's")
        with self._lock:  # learned here, not by the codec: the references load a query through it
            found = self._templates.get(tag_length)
            if found is None:
                found = learn_templates(WHAT, score_references(self.codec, tag_length), self.codec.cc)
                self._templates[tag_length] = found
            return found

    def unpack(self, packed: bytes, tag: str) -> bytes:
        """The serialization inside ``packed`` (``wire``), refused before anything is allocated for
        it unless it can be one of this tag length's layouts."""
        longest = max(v.length for v in self.templates(len(tag)).variants)
        # A packed blob is at most its serialization plus the framing (magic, counts, one header
        # per run): anything longer is refused unread.
        if len(packed) > longest + 64:
            raise MaterialError(f"{WHAT} is {len(packed)} bytes packed; this parameter set's are at most {longest}")
        try:
            return wire.unpack(packed, limit=longest)
        except wire.WireError as exc:
            raise MaterialError(f"{WHAT} is not decodable: {exc}") from None

    def check(self, data: bytes, tag: str) -> None:
        """MaterialError unless ``data`` is a score ciphertext of the mesh's, tagged ``tag``."""
        self.templates(len(tag)).check(data, tag.encode())

    def load(self, packed: bytes, tag: str) -> openfhe.Ciphertext:
        """The score ciphertext in ``packed`` (as it came off the wire), checked completely."""
        data = self.unpack(packed, tag)
        self.check(data, tag)
        try:
            ct = openfhe.DeserializeCiphertextString(data, openfhe.BINARY)
        except Exception as exc:  # cannot happen for checked bytes: a second line
            raise MaterialError(f"{WHAT} does not deserialize: {type(exc).__name__}") from None
        if context_fingerprint(ct.GetCryptoContext()) != self.fingerprint:
            raise MaterialError(f"{WHAT} belongs to another crypto context")
        if ct.NumberCiphertextElements() != 2 or ct.GetLevel() != SCORE_LEVEL or ct.GetNoiseScaleDeg() != 1:
            raise MaterialError(f"{WHAT} is not a two-element ciphertext at level {SCORE_LEVEL}, scale degree 1")
        if ct.GetSlots() != self.params.slots:
            raise MaterialError(f"{WHAT} uses {ct.GetSlots()} slots; the mesh uses {self.params.slots}")
        return ct


_CHECKERS: dict[HEParams, ScoreChecker] = {}
_CHECKERS_GUARD = threading.Lock()


def for_params(params: HEParams) -> ScoreChecker:
    """The process's checker for ``params`` (its templates are learned once per process)."""
    with _CHECKERS_GUARD:
        checker = _CHECKERS.get(params)
        if checker is None:
            checker = _CHECKERS[params] = ScoreChecker(params)
        return checker
