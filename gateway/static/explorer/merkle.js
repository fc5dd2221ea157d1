// RFC 6962 / RFC 9162 Merkle proof verification with WebCrypto SHA-256: a line-by-line port of
// cipherfeed/merkle.py (verify_inclusion, verify_consistency). Sizes and indices are BigInt
// (uint64 in the log; proto3 JSON sends them as strings), hashes Uint8Array. Every failure is a
// ProofError; tests/test_pages_merkle.py runs the transparency-dev/merkle vectors through it in
// Chromium.

export const HASH_SIZE = 32;

export class ProofError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProofError";
  }
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

function prefixed(prefix, ...parts) {
  const out = new Uint8Array(1 + parts.reduce((n, p) => n + p.length, 0));
  out[0] = prefix;
  let at = 1;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function leafHash(data) {
  return sha256(prefixed(0x00, data));
}

export function nodeHash(left, right) {
  return sha256(prefixed(0x01, left, right));
}

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

function big(value, what) {
  if (typeof value === "bigint") return value;
  if (typeof value === "number" && Number.isSafeInteger(value)) return BigInt(value);
  if (typeof value === "string" && /^(0|[1-9][0-9]*)$/.test(value)) return BigInt(value);
  throw new ProofError(`${what} is not a non-negative integer`);
}

function checkHashes(proof, what) {
  if (!Array.isArray(proof)) throw new ProofError(`${what} is a list of hashes`);
  for (const p of proof) {
    if (!(p instanceof Uint8Array) || p.length !== HASH_SIZE) {
      throw new ProofError(`every proof hash is ${HASH_SIZE} bytes`);
    }
  }
}

// RFC 9162 section 2.1.3.2: resolves unless `proof` proves `leaf` at `index` in a tree of `size`.
export async function verifyInclusion(index, size, leaf, proof, root) {
  index = big(index, "leaf index");
  size = big(size, "tree size");
  if (!(index >= 0n && index < size)) {
    throw new ProofError(`leaf index ${index} is outside a tree of size ${size}`);
  }
  // In a size-1 tree the root is the leaf hash itself: without these checks two equal byte
  // strings of any length (even empty) would "verify".
  if (!(leaf instanceof Uint8Array) || !(root instanceof Uint8Array) || leaf.length !== HASH_SIZE || root.length !== HASH_SIZE) {
    throw new ProofError(`a leaf hash and a root are ${HASH_SIZE} bytes`);
  }
  checkHashes(proof, "an inclusion proof");
  let fn = index;
  let sn = size - 1n;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0n) throw new ProofError("inclusion proof is too long");
    if (fn & 1n || fn === sn) {
      r = await nodeHash(p, r);
      if (!(fn & 1n)) {
        while (fn && !(fn & 1n)) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new ProofError("inclusion proof is too short");
  if (!equalBytes(r, root)) throw new ProofError("inclusion proof does not lead to the root");
}

// RFC 9162 section 2.1.4.2: resolves unless the tree of oldSize is a prefix of the one of newSize.
export async function verifyConsistency(oldSize, newSize, oldRoot, newRoot, proof) {
  oldSize = big(oldSize, "first size");
  newSize = big(newSize, "second size");
  if (!(oldSize > 0n && oldSize <= newSize)) {
    throw new ProofError(`no consistency between sizes ${oldSize} and ${newSize}`);
  }
  checkHashes(proof, "a consistency proof");
  if (!(oldRoot instanceof Uint8Array) || !(newRoot instanceof Uint8Array)) {
    throw new ProofError(`a root is ${HASH_SIZE} bytes`);
  }
  if (oldSize === newSize) { // nothing to hash: the roots must simply be the same bytes
    if (proof.length) throw new ProofError("consistency proof between equal sizes must be empty");
    if (!equalBytes(oldRoot, newRoot)) throw new ProofError("equal sizes with different roots");
    return;
  }
  if (oldRoot.length !== HASH_SIZE || newRoot.length !== HASH_SIZE) {
    throw new ProofError(`a root is ${HASH_SIZE} bytes`);
  }
  const path = [...proof];
  if ((oldSize & (oldSize - 1n)) === 0n) path.unshift(oldRoot); // a power of two: the old root is the first node
  if (!path.length) throw new ProofError("consistency proof is empty");
  let fn = oldSize - 1n;
  let sn = newSize - 1n;
  while (fn & 1n) {
    fn >>= 1n;
    sn >>= 1n;
  }
  let fr = path[0];
  let sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0n) throw new ProofError("consistency proof is too long");
    if (fn & 1n || fn === sn) {
      fr = await nodeHash(c, fr);
      sr = await nodeHash(c, sr);
      if (!(fn & 1n)) {
        while (fn && !(fn & 1n)) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      sr = await nodeHash(sr, c);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new ProofError("consistency proof is too short");
  if (!equalBytes(fr, oldRoot)) throw new ProofError("consistency proof does not lead to the old root");
  if (!equalBytes(sr, newRoot)) throw new ProofError("consistency proof does not lead to the new root");
}
