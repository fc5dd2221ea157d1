// C2SP signed notes carrying tlog-checkpoint bodies, verified with WebCrypto Ed25519: a port of
// cipherfeed/checkpoint.py (Verifier.from_vkey, open_note, parse_checkpoint, verify_checkpoint).
// Only keys the user pinned (the trust file) count; the ledger's own list of keys is never used.

import { FormatError, concat, fromBase64, toHex, utf8 } from "./codec.js";
import { equalBytes, sha256 } from "./merkle.js";

const ED25519 = 0x01;
const DASH = "\u2014";
const MAX_TREE_SIZE = 2n ** 64n - 1n;

export class NoteError extends Error {
  constructor(message) {
    super(message);
    this.name = "NoteError";
  }
}

export async function keyId(name, publicKey) {
  return (await sha256(concat(utf8(name), new Uint8Array([0x0a, ED25519]), publicKey))).slice(0, 4);
}

// A C2SP verifier key `<name>+<hex key id>+<base64(0x01 || public key)>`.
export async function parseVkey(text) {
  const t = String(text).trim();
  const first = t.indexOf("+");
  const second = first < 0 ? -1 : t.indexOf("+", first + 1);
  if (first <= 0 || second < 0) throw new NoteError(`not a verifier key: ${t.slice(0, 80)}`);
  const name = t.slice(0, first);
  const kid = t.slice(first + 1, second);
  let raw;
  try {
    raw = fromBase64(t.slice(second + 1), "verifier key");
  } catch (e) {
    throw new NoteError(`not a verifier key: ${t.slice(0, 80)}`);
  }
  if (raw.length !== 33 || raw[0] !== ED25519) throw new NoteError("only Ed25519 verifier keys are supported");
  const publicKey = raw.slice(1);
  const id = await keyId(name, publicKey);
  if (toHex(id) !== kid) throw new NoteError("verifier key id does not match its name and key");
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  return { name, id, publicKey, key, vkey: t };
}

// The body of `note` and the pinned verifiers that signed it; NoteError if none did, or if a
// pinned key's signature is present and does not verify.
export async function openNote(note, verifiers) {
  if (typeof note !== "string") throw new NoteError("a signed note is text");
  const at = note.lastIndexOf("\n\n");
  if (at < 0) throw new NoteError("signed note has no signature block");
  const body = note.slice(0, at) + "\n";
  const sigs = note.slice(at + 2);
  if (!sigs.endsWith("\n")) throw new NoteError("a signed note ends with a newline");
  const signedBy = [];
  for (const line of sigs.slice(0, -1).split("\n")) {
    const parts = line.split(" ");
    if (parts.length !== 3 || parts[0] !== DASH) throw new NoteError(`malformed signature line ${JSON.stringify(line.slice(0, 80))}`);
    let blob;
    try {
      blob = fromBase64(parts[2], "signature");
    } catch (e) {
      throw new NoteError("signature is not base64");
    }
    const verifier = verifiers.find((v) => v.name === parts[1] && blob.length >= 4 && equalBytes(v.id, blob.slice(0, 4)));
    if (!verifier || blob.length !== 68) continue; // unknown keys are ignored, as the spec says
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, verifier.key, blob.slice(4), utf8(body));
    if (!ok) throw new NoteError(`signature by ${verifier.name} does not verify`);
    signedBy.push(verifier);
  }
  if (!signedBy.length) throw new NoteError("no signature by a trusted key");
  return { body, signedBy };
}

export function parseTreeSize(text) {
  if (!/^(0|[1-9][0-9]{0,19})$/.test(text)) throw new NoteError("a checkpoint size is ASCII decimal without leading zeros");
  const size = BigInt(text);
  if (size > MAX_TREE_SIZE) throw new NoteError("a checkpoint size is at most 2**64 - 1");
  return size;
}

export function parseCheckpoint(body) {
  const lines = body.split("\n");
  if (lines.length < 4 || lines[lines.length - 1] !== "") throw new NoteError("a checkpoint body has origin, size and root lines");
  const [origin, sizeText, rootText] = lines;
  if (!origin) throw new NoteError("a checkpoint names its origin");
  const size = parseTreeSize(sizeText);
  let root;
  try {
    root = fromBase64(rootText, "checkpoint root");
  } catch (e) {
    if (e instanceof FormatError) throw new NoteError("checkpoint root is not base64");
    throw e;
  }
  if (root.length !== 32) throw new NoteError("checkpoint root is not 32 bytes");
  return { origin, size, root };
}

// The checkpoint in `note`, signed by a pinned key, for the pinned origin.
export async function verifyCheckpoint(note, verifiers, origin) {
  const { body, signedBy } = await openNote(note, verifiers);
  const checkpoint = parseCheckpoint(body);
  if (checkpoint.origin !== origin) {
    throw new NoteError(`checkpoint is for log ${JSON.stringify(checkpoint.origin.slice(0, 80))}, not ${JSON.stringify(origin)}`);
  }
  return { ...checkpoint, signedBy: signedBy.map((v) => v.vkey) };
}
