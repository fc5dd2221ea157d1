// The anchor contract (services/ledger/contracts/CheckpointAnchor.vy) read by this page itself
// over the chain's JSON-RPC (a node the user picks), never through the ledger or the gateway.
// Selectors and the event topic are computed here from the signatures with Keccak-256.

import { fromHex, toHex } from "./codec.js";

export class ChainError extends Error {
  constructor(message) {
    super(message);
    this.name = "ChainError";
  }
}

const selector = (signature) => "0x" + globalThis.keccak256(signature).slice(0, 8);
export const ROOT_AT = () => selector("root_at(uint256)");
export const LATEST = () => selector("latest()");
export const ANCHORED_TOPIC = () => "0x" + globalThis.keccak256("Anchored(uint256,bytes32,uint256)");
const MAX_LOGS = 10000;

function word(n) {
  return BigInt(n).toString(16).padStart(64, "0");
}

function quantity(text, what) {
  if (typeof text !== "string" || !/^0x[0-9a-fA-F]+$/.test(text)) throw new ChainError(`${what} is not a hex quantity`);
  return BigInt(text);
}

export class Chain {
  constructor(url, timeoutMs = 10000) {
    this.url = url;
    this.timeoutMs = timeoutMs;
    this.nextId = 1;
  }

  async call(method, params) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.timeoutMs);
    let reply;
    try {
      const response = await fetch(this.url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", id: this.nextId++, method, params }),
        signal: controller.signal,
        credentials: "omit",
      });
      reply = await response.json();
    } catch (e) {
      throw new ChainError(`${method} on ${this.url} failed: ${e.message}`);
    } finally {
      clearTimeout(timer);
    }
    if (reply === null || typeof reply !== "object" || reply.error || !("result" in reply)) {
      throw new ChainError(`${method}: ${reply && reply.error ? String(reply.error.message).slice(0, 200) : "no result"}`);
    }
    return reply.result;
  }

  async chainId() {
    return quantity(await this.call("eth_chainId", []), "chain id");
  }

  async hasCode(address) {
    const code = await this.call("eth_getCode", [address, "latest"]);
    return typeof code === "string" && code.length > 2;
  }

  async ethCall(address, data) {
    const result = await this.call("eth_call", [{ to: address, data }, "latest"]);
    return fromHex(result, "eth_call result");
  }

  // The root the contract holds for `size` (32 zero bytes: none).
  async rootAt(address, size) {
    const out = await this.ethCall(address, ROOT_AT() + word(size));
    if (out.length !== 32) throw new ChainError("root_at returned no bytes32");
    return out;
  }

  async latest(address) {
    const out = await this.ethCall(address, LATEST());
    if (out.length !== 64) throw new ChainError("latest returned no (uint256, bytes32)");
    return { size: BigInt("0x" + toHex(out.slice(0, 32))), root: out.slice(32) };
  }

  // Every Anchored event of the contract, oldest first, with its transaction and block.
  async anchors(address) {
    const logs = await this.call("eth_getLogs", [{ address, fromBlock: "0x0", toBlock: "latest", topics: [ANCHORED_TOPIC()] }]);
    if (!Array.isArray(logs)) throw new ChainError("eth_getLogs returned no list");
    if (logs.length > MAX_LOGS) throw new ChainError(`more than ${MAX_LOGS} anchors: not shown`);
    const out = [];
    for (const log of logs) {
      if (String(log.address).toLowerCase() !== address.toLowerCase()) throw new ChainError("the node returned a log of another contract");
      if (!Array.isArray(log.topics) || log.topics.length !== 2) throw new ChainError("an Anchored log without its size topic");
      const data = fromHex(log.data, "log data");
      if (data.length !== 64) throw new ChainError("an Anchored log's data is not (root, anchored_at)");
      out.push({
        size: quantity(log.topics[1], "anchored size"),
        root: data.slice(0, 32),
        anchoredAt: Number(BigInt("0x" + toHex(data.slice(32)))),
        transactionHash: String(log.transactionHash),
        blockNumber: quantity(log.blockNumber, "block number"),
        blockHash: String(log.blockHash),
        removed: Boolean(log.removed),
      });
    }
    return out;
  }

  async transactionReceipt(hash) {
    return this.call("eth_getTransactionReceipt", [hash]);
  }

  async blockNumber() {
    return quantity(await this.call("eth_blockNumber", []), "block number");
  }
}
