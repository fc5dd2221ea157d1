// The transparency explorer: what the page shows it checked itself, against the trust file the
// user pinned in this browser (localStorage) and a chain node the user picked. The gateway only
// carries the ledger's answers; the chain is read directly over JSON-RPC.

import { Gateway, list, str, u64 } from "./api.js";
import { Chain } from "./chain.js";
import { fromBase64, fromHex, toHex, utf8 } from "./codec.js";
import { leafHash, verifyConsistency, verifyInclusion } from "./merkle.js";
import { verifyCheckpoint } from "./note.js";
import { anchorEvidence, canonicalModelLeaf, verifyReceipt } from "./receipt.js";
import { parseTrust } from "./trust.js";

const TRUST_KEY = "cipherfeed.explorer.trust";
const SEEN_KEY = "cipherfeed.explorer.seen"; // the last checkpoint verified here, per log
const CHAIN_KEY = "cipherfeed.explorer.chain";
const DEFAULT_CHAIN = "http://127.0.0.1:8545";
const MAX_ANCHORS_SHOWN = 20;
const LOG_PAGE = 25;
const MODEL_SCAN_PAGES = 8; // model versions are looked for in the newest 8 x 256 leaves
const SCAN_PAGE = 256;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { trust: null, checkpoint: null, logEnd: 0n };

function setStatus(id, status, text) {
  const el = $(id);
  el.dataset.state = status;
  el.textContent = text;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

const short = (hex, n = 16) => (hex.length > n ? hex.slice(0, n) + "…" : hex);

function gateway() {
  return new Gateway($("gateway-url").value || location.origin);
}

function chain() {
  return new Chain($("chain-url").value);
}

async function pinTrust(text, persist) {
  try {
    state.trust = await parseTrust(text);
  } catch (e) {
    state.trust = null;
    setStatus("trust-status", "failed", `trust file refused: ${e.message}`);
    return false;
  }
  if (persist) localStorage.setItem(TRUST_KEY, text);
  const t = state.trust;
  setStatus("trust-status", "pinned", `pinned: fingerprint sha256:${t.fingerprint}`);
  $("trust-origin").textContent = t.logOrigin;
  $("trust-chain").textContent = `chain ${t.chainId}, contract ${t.anchorContract}`;
  $("trust-keys").textContent = t.checkpointVkeys.join("\n");
  return true;
}

async function showCheckpoint() {
  const t = state.trust;
  setStatus("checkpoint-status", "working", "reading the latest checkpoint…");
  let reply;
  try {
    reply = await gateway().checkpoint();
  } catch (e) {
    setStatus("checkpoint-status", "failed", `the ledger did not answer: ${e.message}`);
    return null;
  }
  let cp;
  try {
    cp = await verifyCheckpoint(str(reply.signedNote), t.verifiers, t.logOrigin);
  } catch (e) {
    setStatus("checkpoint-status", "failed", `checkpoint refused: ${e.message}`);
    return null;
  }
  state.checkpoint = cp;
  $("checkpoint-origin").textContent = cp.origin;
  $("checkpoint-size").textContent = String(cp.size);
  $("checkpoint-root").textContent = toHex(cp.root);
  $("checkpoint-signers").textContent = cp.signedBy.map((v) => v.split("+")[0] + "+" + v.split("+")[1]).join(", ");
  setStatus("checkpoint-status", "verified", `size ${cp.size}: Ed25519 signature by a pinned key verified in this page`);
  await checkSeen(cp);
  return cp;
}

// Consistency with the checkpoint this browser verified last time: a log that forked or rewrote
// its history since then cannot produce this proof.
async function checkSeen(cp) {
  let seenAll;
  try {
    seenAll = JSON.parse(localStorage.getItem(SEEN_KEY) || "{}") || {};
  } catch (e) {
    seenAll = {};
  }
  const seen = seenAll[state.trust.fingerprint];
  const remember = () => {
    seenAll[state.trust.fingerprint] = { size: String(cp.size), root: toHex(cp.root) };
    localStorage.setItem(SEEN_KEY, JSON.stringify(seenAll));
  };
  if (!seen) {
    setStatus("seen-status", "first", "first checkpoint seen by this browser for this trust file: remembered");
    remember();
    return;
  }
  let oldSize;
  let oldRoot;
  try {
    oldSize = BigInt(seen.size);
    oldRoot = fromHex(seen.root, "remembered root");
  } catch (e) {
    setStatus("seen-status", "first", "the checkpoint remembered here was unreadable: replaced by this one");
    remember();
    return;
  }
  if (oldSize > cp.size) {
    setStatus("seen-status", "failed", `the log shrank: this browser saw size ${oldSize} before, now ${cp.size}`);
    return;
  }
  try {
    const proof = oldSize === cp.size ? { hashes: [] } : await gateway().consistency(oldSize, cp.size);
    await verifyConsistency(oldSize, cp.size, oldRoot, cp.root, list(proof.hashes).map((h) => fromBase64(h, "proof hash")));
  } catch (e) {
    setStatus("seen-status", "failed", `NOT consistent with the checkpoint of size ${oldSize} seen before: ${e.message}`);
    return;
  }
  setStatus("seen-status", "verified", `consistent with the checkpoint of size ${oldSize} this browser saw before`);
  remember();
}

async function showAnchors(cp) {
  const t = state.trust;
  const body = $("anchors-body");
  body.replaceChildren();
  setStatus("anchors-status", "working", `reading contract ${t.anchorContract} on ${$("chain-url").value}…`);
  const c = chain();
  let anchors;
  try {
    const chainId = await c.chainId();
    if (chainId !== BigInt(t.chainId)) {
      setStatus("anchors-status", "failed", `the node serves chain ${chainId}, not the pinned ${t.chainId}`);
      return;
    }
    if (!(await c.hasCode(t.anchorContract))) {
      setStatus("anchors-status", "failed", `no contract at the pinned address ${t.anchorContract} on chain ${chainId}`);
      return;
    }
    anchors = (await c.anchors(t.anchorContract)).filter((a) => !a.removed);
  } catch (e) {
    setStatus("anchors-status", "failed", `reading the chain failed: ${e.message}`);
    return;
  }
  const g = gateway();
  const shown = anchors.slice(-MAX_ANCHORS_SHOWN);
  let previous = anchors.length > shown.length ? anchors[anchors.length - shown.length - 1] : null;
  let failures = 0;
  for (const a of shown) {
    const row = document.createElement("tr");
    row.dataset.size = String(a.size);
    cell(row, String(a.size));
    cell(row, short(toHex(a.root), 24), "mono");
    cell(row, short(a.transactionHash, 20), "mono").title = a.transactionHash;
    cell(row, String(a.blockNumber));
    cell(row, new Date(a.anchoredAt * 1000).toISOString().replace(".000", ""));
    // Each anchored root must extend the one before it (one log, never rewritten), and the
    // latest checkpoint must extend (or equal) every anchored root at or below its size.
    let verdict = "ok";
    try {
      const receipt = await c.transactionReceipt(a.transactionHash);
      if (!receipt || receipt.status !== "0x1") throw new Error("transaction not successful");
      if (previous) {
        const p = await g.consistency(previous.size, a.size);
        await verifyConsistency(previous.size, a.size, previous.root, a.root, list(p.hashes).map((h) => fromBase64(h, "proof hash")));
      }
      if (cp && a.size <= cp.size) {
        const p = a.size === cp.size ? { hashes: [] } : await g.consistency(a.size, cp.size);
        await verifyConsistency(a.size, cp.size, a.root, cp.root, list(p.hashes).map((h) => fromBase64(h, "proof hash")));
      }
    } catch (e) {
      verdict = `FAILED: ${e.message}`;
      failures++;
    }
    const v = cell(row, verdict);
    row.dataset.state = verdict === "ok" ? "verified" : "failed";
    v.className = verdict === "ok" ? "ok" : "bad";
    body.appendChild(row);
    previous = a;
  }
  const anchoredCp = cp && shown.some((a) => a.size === cp.size);
  if (failures) {
    setStatus("anchors-status", "failed", `${failures} of ${shown.length} anchors failed their checks`);
  } else if (!anchors.length) {
    setStatus("anchors-status", "none", "no anchor in the pinned contract yet");
  } else {
    setStatus(
      "anchors-status",
      "verified",
      `${anchors.length} anchors read from chain ${t.chainId}; each consistent with the one before` +
        (cp ? (anchoredCp ? `; the latest checkpoint (size ${cp.size}) is anchored` : `; the latest checkpoint (size ${cp.size}) is not anchored yet`) : ""),
    );
  }
  $("checkpoint-anchored").textContent = cp ? (anchoredCp ? "yes: its root is in the pinned contract" : "not yet") : "";
  $("checkpoint-anchored").dataset.state = anchoredCp ? "anchored" : "pending";
}

async function showModel(cp) {
  try {
    const m = await gateway().model();
    $("model-version").textContent = str(m.version);
    $("model-items").textContent = String(m.itemCount || 0);
    $("model-by").textContent = str(m.createdBy);
    $("model-manifest").textContent = m.manifestSha256 ? `${toHex(fromBase64(m.manifestSha256, "manifest digest"))} (${u64(m.manifestBytes)} bytes)` : "";
    setStatus("model-status", "shown", "the serving model, as the recommender reports it; receipts below name the model that answered them");
    await showModelVersions(cp, str(m.version)).catch((e) => setStatus("model-status", "failed", `model versions: ${e.message}`));
  } catch (e) {
    setStatus("model-status", "failed", `model info unavailable: ${e.message}`);
  }
}

function modelFromJson(m) {
  const millis = u64(m.unixMillis);
  return {
    model_version: str(m.modelVersion), created_by: str(m.createdBy),
    item_count: Number.isSafeInteger(m.itemCount) ? m.itemCount : 0, unix_millis: Number(millis),
  };
}

// A model record's inclusion in the verified checkpoint: its leaf hash is computed here from the
// record, the proof checked against the checkpoint's root.
async function checkModel(index, record, cp) {
  const leaf = await leafHash(utf8(canonicalModelLeaf(record)));
  const proof = await gateway().inclusion(index, cp.size);
  await verifyInclusion(index, cp.size, leaf, list(proof.hashes).map((h) => fromBase64(h, "proof hash")), cp.root);
}

async function showLog(end) {
  const cp = state.checkpoint;
  const body = $("log-body");
  body.replaceChildren();
  if (!cp) return;
  end = end === undefined ? cp.size : end;
  const start = end > BigInt(LOG_PAGE) ? end - BigInt(LOG_PAGE) : 0n;
  state.logEnd = end;
  $("log-older").disabled = start === 0n;
  $("log-newer").disabled = end >= cp.size;
  if (end === 0n) {
    setStatus("log-status", "none", "the log is empty");
    return;
  }
  let reply;
  try {
    reply = await gateway().entries(start, Number(end - start));
  } catch (e) {
    setStatus("log-status", "failed", `the ledger did not answer: ${e.message}`);
    return;
  }
  let failures = 0;
  for (const e of list(reply.entries).reverse()) {
    const index = u64(e.leafIndex);
    const row = document.createElement("tr");
    row.dataset.index = String(index);
    cell(row, String(index));
    if (e.model) {
      const m = modelFromJson(e.model);
      row.dataset.kind = "model";
      cell(row, "model");
      cell(row, `${short(m.model_version, 24)} (${m.item_count} items, ${m.created_by}, from ${new Date(m.unix_millis).toISOString()})`, "mono");
      try {
        await checkModel(index, m, cp);
        cell(row, "included (verified)", "ok");
      } catch (err) {
        failures++;
        cell(row, `FAILED: ${err.message}`, "bad");
      }
    } else if (e.receipt) {
      row.dataset.kind = "receipt";
      cell(row, "receipt");
      cell(row, "not listed: a receipt's holder looks it up by its id (below)");
      cell(row, "");
    } else {
      row.dataset.kind = "other";
      cell(row, "other");
      cell(row, "a leaf of no kind this ledger knows");
      cell(row, "");
    }
    body.appendChild(row);
  }
  setStatus("log-status", failures ? "failed" : "shown",
    `leaves ${start}–${end - 1n} of the checkpoint's ${cp.size}` + (failures ? `; ${failures} model records FAILED inclusion` : ""));
}

// Model versions the log records (each recommender logs the models it loads), newest first, each
// verified included; and which one the recommender says it serves now.
async function showModelVersions(cp, serving) {
  const body = $("models-body");
  body.replaceChildren();
  if (!cp) return;
  const found = [];
  let end = cp.size;
  for (let page = 0; page < MODEL_SCAN_PAGES && end > 0n; page++) {
    const start = end > BigInt(SCAN_PAGE) ? end - BigInt(SCAN_PAGE) : 0n;
    const reply = await gateway().entries(start, Number(end - start));
    for (const e of list(reply.entries).reverse()) if (e.model) found.push([u64(e.leafIndex), modelFromJson(e.model)]);
    end = start;
  }
  let servingLogged = false;
  for (const [index, m] of found) {
    const row = document.createElement("tr");
    row.dataset.version = m.model_version;
    cell(row, m.model_version, "mono");
    cell(row, String(index));
    cell(row, new Date(m.unix_millis).toISOString());
    cell(row, String(m.item_count));
    let verdict = "included (verified)";
    try {
      await checkModel(index, m, cp);
      if (m.model_version === serving) servingLogged = true;
    } catch (err) {
      verdict = `FAILED: ${err.message}`;
    }
    const v = cell(row, verdict + (m.model_version === serving ? "; serving now" : ""));
    v.className = verdict.startsWith("FAILED") ? "bad" : "ok";
    row.dataset.state = verdict.startsWith("FAILED") ? "failed" : "verified";
    body.appendChild(row);
  }
  $("model-logged").dataset.state = servingLogged ? "verified" : "failed";
  $("model-logged").textContent = servingLogged
    ? "yes: the serving model is recorded in the signed log"
    : `not found in the newest ${MODEL_SCAN_PAGES * SCAN_PAGE} leaves`;
}

async function onVerifyReceipt() {
  const out = $("receipt-result");
  const details = $("receipt-details");
  details.replaceChildren();
  if (!state.trust) {
    setStatus("receipt-result", "failed", "pin a trust file first");
    return;
  }
  setStatus("receipt-result", "working", "verifying…");
  const g = gateway();
  const c = chain();
  try {
    const v = await verifyReceipt($("receipt-input").value, {
      gateway: g,
      trust: state.trust,
      anchorFor: (cp) => anchorEvidence(cp, { chain: c, trust: state.trust, gateway: g }),
    });
    const lines = [
      ["receipt", `${v.id}${v.compared ? " — equals the copy pasted here" : " — NOT compared with a copy (only the id was given)"}`],
      ["model", v.receipt.model_version],
      ["key", `${v.receipt.key_id} v${v.receipt.key_version}`],
      ["time", new Date(v.receipt.unix_millis).toISOString()],
      ["signature", `checkpoint ${v.checkpoint.origin} size ${v.checkpoint.size}: signed by a pinned key`],
      ["inclusion", `leaf ${v.leafIndex} of ${v.checkpoint.size}: ok (WebCrypto SHA-256)`],
      ["anchor", `size ${v.anchor.size} in ${state.trust.anchorContract} on chain ${state.trust.chainId}: ${v.anchor.how}`],
    ];
    for (const [k, text] of lines) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = text;
      details.append(dt, dd);
    }
    out.dataset.step = "";
    setStatus("receipt-result", "verified", "VERIFIED: in the signed log, anchored on chain");
  } catch (e) {
    out.dataset.step = e.step || "";
    setStatus("receipt-result", "failed", `REJECTED at ${e.step ? e.message : "receipt: " + e.message}`);
  }
}

// confirmed: the user clicked (refresh, pin). Only then is the chain node kept for later visits:
// a link's ?chain= must never replace the node the user chose without their say, since the anchor
// check is only as good as the node (an operator's node can fake the pinned chain id and events).
async function refresh(confirmed) {
  if (!state.trust) return;
  if (confirmed === true) localStorage.setItem(CHAIN_KEY, $("chain-url").value);
  const cp = await showCheckpoint();
  await Promise.all([showAnchors(cp), showModel(cp), showLog()]);
  document.body.dataset.ready = "true";
}

async function main() {
  const storedChain = localStorage.getItem(CHAIN_KEY) || DEFAULT_CHAIN;
  $("gateway-url").value = params.get("api") || location.origin;
  $("chain-url").value = params.get("chain") || storedChain;
  // a link that names another node or gateway than this browser's: shown, not used until confirmed
  const unconfirmed = [];
  if (params.get("chain") && params.get("chain") !== storedChain) unconfirmed.push(`chain node ${params.get("chain")}`);
  if (params.get("api") && params.get("api") !== location.origin) unconfirmed.push(`gateway ${params.get("api")}`);
  if (!window.isSecureContext || !crypto.subtle) {
    setStatus("trust-status", "failed", "this page needs a secure context (https, or http on localhost) for WebCrypto; nothing can be verified here");
    return;
  }
  $("trust-file").addEventListener("change", async (ev) => {
    const f = ev.target.files[0];
    if (f) $("trust-input").value = await f.text();
  });
  $("trust-pin").addEventListener("click", async () => {
    if (await pinTrust($("trust-input").value, true)) await refresh(true);
  });
  $("trust-unpin").addEventListener("click", () => {
    localStorage.removeItem(TRUST_KEY);
    state.trust = null;
    setStatus("trust-status", "none", "no trust file pinned");
  });
  $("refresh").addEventListener("click", () => refresh(true));
  $("log-older").addEventListener("click", () => showLog(state.logEnd > BigInt(LOG_PAGE) ? state.logEnd - BigInt(LOG_PAGE) : 0n));
  $("log-newer").addEventListener("click", () => {
    const next = state.logEnd + BigInt(LOG_PAGE);
    showLog(next > state.checkpoint.size ? state.checkpoint.size : next);
  });
  $("receipt-verify").addEventListener("click", onVerifyReceipt);
  const saved = localStorage.getItem(TRUST_KEY);
  if (saved && (await pinTrust(saved, false))) {
    if (unconfirmed.length === 0) await refresh(false);
    else setStatus("checkpoint-status", "none", `this link names ${unconfirmed.join(" and ")}, not the ones this browser uses: check them and press refresh to verify with them`);
  }
  else setStatus("trust-status", "none", "no trust file pinned: load or paste the operator's trust file and compare its fingerprint with the one published out of band");
  document.body.dataset.loaded = "true";
}

main();
