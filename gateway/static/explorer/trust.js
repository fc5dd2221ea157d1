// The trust file the user pins (cipherfeed/trust.py's format, checked as strictly): the only
// source of the log's origin, the checkpoint keys, the chain id and the anchor contract. What the
// gateway, the ledger or the key service say about any of these is never used.

import { toHex, utf8 } from "./codec.js";
import { parseVkey } from "./note.js";
import { sha256 } from "./merkle.js";

export const FORMAT = "cipherfeed-trust/v1";
const FIELDS = ["anchor_contract", "chain_id", "checkpoint_vkeys", "format", "log_origin", "mesh_ca_pem"];
const MAX_TRUST_FILE_BYTES = 256 * 1024;
const ADDRESS = /^0x[0-9a-fA-F]{40}$/;

export class TrustError extends Error {
  constructor(message) {
    super(message);
    this.name = "TrustError";
  }
}

function keccakHex(text) {
  if (typeof globalThis.keccak256 !== "function") throw new TrustError("keccak256 (vendor/js-sha3) is not loaded");
  return globalThis.keccak256(text);
}

// The EIP-55 form of `address`; TrustError if it is not an address, or a mixed-case one that
// fails its checksum (a typo'd address must not silently become another contract).
export function checksumAddress(address) {
  if (typeof address !== "string" || !ADDRESS.test(address)) {
    throw new TrustError(`anchor_contract ${JSON.stringify(String(address).slice(0, 60))} is not a 0x-prefixed 20-byte address`);
  }
  const body = address.slice(2);
  const lower = body.toLowerCase();
  const hash = keccakHex(lower);
  let out = "0x";
  for (let i = 0; i < 40; i++) out += parseInt(hash[i], 16) >= 8 ? lower[i].toUpperCase() : lower[i];
  if (body !== lower && body !== body.toUpperCase() && address !== out) {
    throw new TrustError(`anchor_contract ${address} fails its EIP-55 checksum`);
  }
  return out;
}

// Python's json.dumps(sort_keys=True, separators=(",", ":")) with ensure_ascii: what
// TrustAnchors.canonical() hashes into the fingerprint.
function pythonAsciiJson(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return `[${value.map(pythonAsciiJson).join(",")}]`;
  if (typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${pythonAsciiJson(k)}:${pythonAsciiJson(value[k])}`).join(",")}}`;
  }
  if (typeof value === "string") {
    return JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
  }
  return JSON.stringify(value);
}

export async function parseTrust(text) {
  if (typeof text !== "string") throw new TrustError("a trust file is text");
  if (utf8(text).length > MAX_TRUST_FILE_BYTES) throw new TrustError(`a trust file is at most ${MAX_TRUST_FILE_BYTES} bytes`);
  let d;
  try {
    d = JSON.parse(text);
  } catch (e) {
    throw new TrustError(`not JSON: ${e.message}`);
  }
  if (d === null || typeof d !== "object" || Array.isArray(d)) throw new TrustError("a trust file is a JSON object");
  const keys = Object.keys(d).sort();
  if (keys.join() !== FIELDS.join()) {
    const missing = FIELDS.filter((f) => !keys.includes(f));
    const extra = keys.filter((k) => !FIELDS.includes(k)).map((k) => k.slice(0, 40));
    throw new TrustError(`trust file fields: missing ${JSON.stringify(missing)}, unknown ${JSON.stringify(extra)}`);
  }
  if (d.format !== FORMAT) throw new TrustError(`format ${JSON.stringify(String(d.format).slice(0, 40))} is not ${JSON.stringify(FORMAT)}`);
  const origin = d.log_origin;
  if (typeof origin !== "string" || !origin || origin.includes("\n") || origin.length > 255) {
    throw new TrustError("log_origin is a non-empty single-line string");
  }
  const vkeys = d.checkpoint_vkeys;
  if (!Array.isArray(vkeys) || !vkeys.length || !vkeys.every((v) => typeof v === "string")) {
    throw new TrustError("checkpoint_vkeys is a non-empty list of C2SP verifier keys");
  }
  const verifiers = [];
  for (const v of vkeys) {
    try {
      verifiers.push(await parseVkey(v));
    } catch (e) {
      throw new TrustError(`checkpoint_vkeys: ${e.message}`);
    }
  }
  const chainId = d.chain_id;
  // JSON numbers above 2**53 lose digits in JavaScript: refuse rather than pin a rounded id.
  if (!Number.isSafeInteger(chainId) || chainId <= 0) throw new TrustError("chain_id is a positive integer (at most 2**53 - 1 here)");
  const ca = d.mesh_ca_pem;
  if (ca !== null && (typeof ca !== "string" || !ca.includes("-----BEGIN CERTIFICATE-----"))) {
    throw new TrustError("mesh_ca_pem is a PEM certificate or null");
  }
  const anchorContract = checksumAddress(d.anchor_contract);
  const canonical = {
    format: FORMAT, log_origin: origin, checkpoint_vkeys: vkeys, chain_id: chainId, anchor_contract: anchorContract, mesh_ca_pem: ca,
  };
  const fingerprint = toHex(await sha256(utf8(pythonAsciiJson(canonical))));
  return { logOrigin: origin, checkpointVkeys: vkeys, verifiers, chainId, anchorContract, meshCaPem: ca, fingerprint };
}
