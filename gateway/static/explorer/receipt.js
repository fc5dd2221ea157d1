// A receipt checked end to end in the page, as cipherfeed/client/verify.py does: its fields hash
// to its id (RFC 6962 leaf of its canonical JSON), the covering checkpoint is signed by a pinned
// key for the pinned origin, the inclusion proof leads to that checkpoint's root, and the root is
// anchored in the pinned contract on the pinned chain (directly, or a later anchored root with a
// consistency proof). Each failure names its step.

import { fromBase64, toHex, utf8 } from "./codec.js";
import { ProofError, equalBytes, leafHash, verifyConsistency, verifyInclusion } from "./merkle.js";
import { NoteError, verifyCheckpoint } from "./note.js";
import { ApiError, list, str, u64 } from "./api.js";

export const RECEIPT_FIELDS = ["key_id", "key_version", "model_version", "query_sha256", "response_sha256", "unix_millis"];
const INTS = new Set(["key_version", "unix_millis"]);

export class VerificationError extends Error {
  constructor(step, message) {
    super(`${step}: ${message}`);
    this.name = "VerificationError";
    this.step = step;
  }
}

// cipherfeed/receipts.py canonical(): sorted keys, no spaces, UTF-8 (ensure_ascii=False).
export function canonicalLeaf(receipt) {
  const obj = { type: "cipherfeed.receipt.v1", ...receipt };
  return "{" + Object.keys(obj).sort().map((k) => `${JSON.stringify(k)}:${JSON.stringify(obj[k])}`).join(",") + "}";
}

// cipherfeed/receipts.py ModelRecord.leaf(): what the recommender logs for each model it loads.
export function canonicalModelLeaf(m) {
  const obj = { type: "cipherfeed.model.v1", created_by: m.created_by, item_count: m.item_count, model_version: m.model_version, unix_millis: m.unix_millis };
  return "{" + Object.keys(obj).sort().map((k) => `${JSON.stringify(k)}:${JSON.stringify(obj[k])}`).join(",") + "}";
}

export async function receiptId(receipt) {
  return toHex(await leafHash(utf8(canonicalLeaf(receipt))));
}

// The user's input: a saved receipt (the JSON `cipherfeed recommend` keeps under receipts/), or
// only its id (then nothing is compared with a copy, and the result says so).
export function parseInput(text) {
  const t = String(text).trim();
  if (/^[0-9a-fA-F]{64}$/.test(t)) return { id: t.toLowerCase(), saved: null };
  let d;
  try {
    d = JSON.parse(t);
  } catch (e) {
    throw new VerificationError("receipt", "neither a receipt id (64 hex digits) nor a receipt's JSON");
  }
  if (d === null || typeof d !== "object" || Array.isArray(d)) throw new VerificationError("receipt", "a receipt is a JSON object");
  const keys = Object.keys(d).sort();
  if (keys.join() !== RECEIPT_FIELDS.join()) {
    const missing = RECEIPT_FIELDS.filter((f) => !keys.includes(f));
    const extra = keys.filter((k) => !RECEIPT_FIELDS.includes(k)).map((k) => k.slice(0, 40));
    throw new VerificationError("receipt", `the receipt has the wrong fields (missing ${JSON.stringify(missing)}, unknown ${JSON.stringify(extra)})`);
  }
  for (const k of RECEIPT_FIELDS) {
    const ok = INTS.has(k) ? Number.isSafeInteger(d[k]) : typeof d[k] === "string";
    if (!ok) throw new VerificationError("receipt", `${k} is not ${INTS.has(k) ? "an integer" : "a string"}`);
  }
  const saved = {};
  for (const k of RECEIPT_FIELDS) saved[k] = d[k];
  return { id: null, saved };
}

function receiptFromJson(r) {
  const millis = u64(r.unixMillis);
  if (millis > BigInt(Number.MAX_SAFE_INTEGER)) throw new VerificationError("receipt", "unix_millis out of range");
  const version = r.keyVersion === undefined ? 0 : r.keyVersion;
  if (!Number.isSafeInteger(version) || version < 0) throw new VerificationError("receipt", "key_version is not an integer");
  return {
    key_id: str(r.keyId), key_version: version, model_version: str(r.modelVersion),
    query_sha256: str(r.querySha256), response_sha256: str(r.responseSha256), unix_millis: Number(millis),
  };
}

const b64List = (v, what) => list(v).map((h) => fromBase64(h, what));

// `anchorFor(checkpoint)` returns the on-chain evidence (see explorer.js); it raises
// VerificationError("anchor", ...) itself.
export async function verifyReceipt(input, { gateway, trust, anchorFor }) {
  const { id: givenId, saved } = parseInput(input);
  const id = givenId || (await receiptId(saved));
  let bundle;
  try {
    bundle = await gateway.receipt(id);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) throw new VerificationError("receipt", `receipt ${id.slice(0, 16)}… is not in the log`);
    if (e instanceof ApiError && e.status === 400 && e.code === 9) throw new VerificationError("receipt", `not covered by a checkpoint yet (${e.message})`);
    throw new VerificationError("receipt", `the ledger did not answer: ${e.message}`);
  }
  let ledgerCopy;
  try {
    ledgerCopy = receiptFromJson(bundle.receipt || {});
  } catch (e) {
    throw new VerificationError("receipt", e.message);
  }
  const leaf = await leafHash(utf8(canonicalLeaf(ledgerCopy)));
  if (toHex(leaf) !== id) throw new VerificationError("receipt", "the ledger's receipt does not hash to this id");
  if (saved && canonicalLeaf(saved) !== canonicalLeaf(ledgerCopy)) {
    throw new VerificationError("receipt", "the ledger's receipt differs from this copy");
  }
  const cp = bundle.checkpoint || {};
  let checkpoint;
  try {
    checkpoint = await verifyCheckpoint(str(cp.signedNote), trust.verifiers, trust.logOrigin);
  } catch (e) {
    if (e instanceof NoteError) throw new VerificationError("signature", e.message);
    throw e;
  }
  const leafIndex = u64(bundle.leafIndex);
  try {
    const hashes = b64List((bundle.inclusion || {}).hashes, "inclusion proof hash");
    await verifyInclusion(leafIndex, checkpoint.size, leaf, hashes, checkpoint.root);
  } catch (e) {
    if (e instanceof ProofError || e.name === "FormatError") throw new VerificationError("inclusion", e.message);
    throw e;
  }
  const anchor = await anchorFor(checkpoint);
  return { id, receipt: ledgerCopy, compared: Boolean(saved), leafIndex, checkpoint, anchor };
}

// On-chain evidence for `checkpoint`: the pinned contract's root at its size, or its latest root
// with a consistency proof from the checkpoint (fetched from the gateway, checked here).
export async function anchorEvidence(checkpoint, { chain, trust, gateway }) {
  try {
    const chainId = await chain.chainId();
    if (chainId !== BigInt(trust.chainId)) throw new VerificationError("anchor", `the node serves chain ${chainId}, not the pinned ${trust.chainId}`);
    const root = await chain.rootAt(trust.anchorContract, checkpoint.size);
    if (!root.every((b) => b === 0)) {
      if (!equalBytes(root, checkpoint.root)) throw new VerificationError("anchor", "the chain holds another root for this checkpoint's size");
      return { size: checkpoint.size, root, how: "the checkpoint's own root" };
    }
    const latest = await chain.latest(trust.anchorContract);
    if (latest.size < checkpoint.size) throw new VerificationError("anchor", `no anchor on chain at or after size ${checkpoint.size} yet`);
    let proof;
    try {
      proof = await gateway.consistency(checkpoint.size, latest.size);
      await verifyConsistency(checkpoint.size, latest.size, checkpoint.root, latest.root, b64List(proof.hashes, "consistency proof hash"));
    } catch (e) {
      throw new VerificationError("anchor", `later anchor is not consistent with the checkpoint: ${e.message}`);
    }
    return { size: latest.size, root: latest.root, how: `a later root (size ${latest.size}) with a consistency proof` };
  } catch (e) {
    if (e instanceof VerificationError) throw e;
    throw new VerificationError("anchor", `reading ${trust.anchorContract} on chain failed: ${e.message}`);
  }
}
