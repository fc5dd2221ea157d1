// The feed page: talks only to the cipherfeed process that served it (same origin), with the
// run's token from the URL fragment. It never sees a key; it shows what the device computed.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "cipherfeed.ui.token";
const POLL_MS = 250;
const RECEIPT_POLLS = 120;

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  history.replaceState(null, "", location.pathname); // the token leaves the address bar
}
const token = sessionStorage.getItem(TOKEN_KEY) || "";

async function api(method, path, body) {
  const init = { method, headers: { "X-Cipherfeed-Token": token }, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || `HTTP ${response.status}`);
  return value;
}

function setState(el, state, text) {
  el.dataset.state = state;
  el.textContent = text;
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showStages(job) {
  const list = $("stages");
  list.replaceChildren();
  for (const s of job.stages) {
    const li = document.createElement("li");
    li.textContent = s.ms === undefined ? `${s.stage}…` : `${s.stage} (${s.ms} ms)`;
    list.appendChild(li);
  }
}

// Follows a job until it ends, showing each stage as it starts (key generation takes seconds).
async function follow(job) {
  while (job.state === "running") {
    setState($("progress"), "running", job.stage);
    showStages(job);
    await pause(POLL_MS);
    job = await api("GET", `/api/jobs/${job.id}`);
  }
  showStages(job);
  if (job.state === "failed") setState($("progress"), "failed", job.error);
  else setState($("progress"), "done", `${job.kind}: done`);
  return job;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function link(row, url, text) {
  const td = document.createElement("td");
  const a = document.createElement("a");
  a.href = url;
  a.textContent = text;
  a.rel = "noreferrer noopener";
  a.target = "_blank";
  td.appendChild(a);
  row.appendChild(td);
}

async function showStatus() {
  const s = await api("GET", "/api/status");
  const signedIn = Boolean(s.user);
  setState($("status"), signedIn ? "signed-in" : "signed-out",
    signedIn ? `signed in as ${s.user} (${s.identity} account ${s.owner}); key ${s.key_id.slice(0, 16)}…; mesh ${s.target}`
             : `not signed in; mesh ${s.target}`);
  $("signout").hidden = !signedIn;
  $("history-box").hidden = !signedIn;
  $("feed-box").hidden = !signedIn;
  if (signedIn) await showHistory();
  return s;
}

async function showHistory() {
  const h = await api("GET", "/api/history");
  const body = $("history");
  body.replaceChildren();
  for (const e of h.entries) {
    const row = document.createElement("tr");
    row.dataset.itemId = e.item_id;
    cell(row, new Date(e.unix * 1000).toISOString().replace(".000", ""));
    cell(row, e.kind);
    cell(row, e.creator_id || "(not in this catalogue)");
    if (e.url) link(row, e.url, e.item_id);
    else cell(row, e.item_id, "mono");
    body.appendChild(row);
  }
}

async function signInDevice() {
  const job = await follow(await api("POST", "/api/signin", { user: $("user").value }));
  await showStatus();
  return job;
}

async function signInWallet() {
  const [address] = await window.ethereum.request({ method: "eth_requestAccounts" });
  const challenge = await api("POST", "/api/wallet/challenge", { address, user: $("user").value });
  const hex = "0x" + Array.from(new TextEncoder().encode(challenge.message), (b) => b.toString(16).padStart(2, "0")).join("");
  const signature = await window.ethereum.request({ method: "personal_sign", params: [hex, challenge.address] });
  await follow(await api("POST", "/api/wallet/signin", { signature }));
  await showStatus();
}

async function verifyReceipt(id) {
  const el = $("receipt-status");
  for (let i = 0; i < RECEIPT_POLLS; i++) {
    let v;
    try {
      v = await api("POST", `/api/receipts/${id}/verify`, {});
    } catch (e) {
      setState(el, "failed", `${id.slice(0, 16)}…: ${e.message}`);
      return;
    }
    el.title = id;
    if (v.state !== "pending") {
      setState(el, v.state, `${id.slice(0, 16)}… ${v.state}: ${v.message}`);
      return;
    }
    setState(el, "pending", `${id.slice(0, 16)}… waiting for the ledger's checkpoint and anchor (${v.message})`);
    await pause(1000);
  }
}

async function requestFeed() {
  $("feed").replaceChildren();
  setState($("receipt-status"), "none", "");
  const k = Number($("k").value);
  const perCreator = Number($("per-creator").value);
  const job = await follow(await api("POST", "/api/feed", { k, per_creator: perCreator }));
  if (job.state !== "done") return;
  const r = job.result;
  const body = $("feed");
  for (const item of r.items) {
    const row = document.createElement("tr");
    row.dataset.itemId = item.item_id;
    cell(row, String(item.rank));
    cell(row, item.score.toFixed(6), "mono");
    cell(row, `${item.creator_nickname || item.creator_id} (@${item.creator_id})`);
    link(row, item.url, item.item_id);
    body.appendChild(row);
  }
  const stats = $("feed-stats");
  stats.replaceChildren();
  const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
  const rows = [
    ["history", `${r.history_engagements} engagements → weights over ${r.item_count} items`],
    ["upload (encrypted)", `${r.upload.ciphertexts} ciphertexts, ${kib(r.upload.bytes)}, ${r.upload.ms} ms`],
    ["score request", r.score.request],
    ["score response", `${kib(r.score.response_bytes)} of encrypted scores${r.score.from_cache ? " (server's result cache)" : ""}`],
    ["server time", `${r.score.server_ms} ms`],
    ["round trip + decryption", `${r.score.round_trip_ms} ms`],
    ["model", r.model_version],
  ];
  for (const [k2, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k2;
    const dd = document.createElement("dd");
    dd.textContent = v;
    stats.append(dt, dd);
  }
  document.body.dataset.feed = "shown";
  if (r.receipt_id) await verifyReceipt(r.receipt_id);
  else setState($("receipt-status"), "unverified", "no receipt (the mesh runs without a ledger)");
}

function guard(fn) {
  return async () => {
    try {
      await fn();
    } catch (e) {
      setState($("progress"), "failed", e.message);
    }
  };
}

async function main() {
  $("signin-device").addEventListener("click", guard(signInDevice));
  $("signin-wallet").addEventListener("click", guard(signInWallet));
  $("signout").addEventListener("click", guard(async () => { await api("POST", "/api/signout", {}); await showStatus(); }));
  $("feed-request").addEventListener("click", guard(requestFeed));
  $("signin-wallet").hidden = !window.ethereum;
  try {
    await showStatus();
  } catch (e) {
    setState($("status"), "failed", `cannot reach the device process: ${e.message}`);
  }
  document.body.dataset.loaded = "true";
}

main();
