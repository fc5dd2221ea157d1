// The gateway's HTTP routes (the google.api.http annotations in protos/cipherfeed/v1), proto3
// JSON as protobuf's json_format prints it: lowerCamelCase names, bytes base64, 64-bit integers as
// strings, fields at their default value omitted. Everything read here is checked before use.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status; // HTTP status
    this.code = code; // google.rpc.Status code, when the gateway sent one
  }
}

const MAX_REPLY_BYTES = 4 * 1024 * 1024;

export class Gateway {
  constructor(base, timeoutMs = 15000) {
    this.base = base.replace(/\/+$/, "");
    this.timeoutMs = timeoutMs;
  }

  async get(path, query = {}) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) params.set(k, String(v));
    const url = this.base + path + (params.toString() ? "?" + params : "");
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.timeoutMs);
    try {
      const response = await fetch(url, { headers: { accept: "application/json" }, signal: controller.signal, credentials: "omit" });
      const text = await response.text();
      if (text.length > MAX_REPLY_BYTES) throw new ApiError(response.status, 0, `${path}: reply too large`);
      let body = null;
      try {
        body = text ? JSON.parse(text) : {};
      } catch (e) {
        throw new ApiError(response.status, 0, `${path}: HTTP ${response.status}, not JSON`);
      }
      if (!response.ok) {
        const message = body && typeof body.message === "string" ? body.message.slice(0, 300) : `HTTP ${response.status}`;
        throw new ApiError(response.status, body && Number.isInteger(body.code) ? body.code : 0, message);
      }
      if (body === null || typeof body !== "object" || Array.isArray(body)) throw new ApiError(response.status, 0, `${path}: not a JSON object`);
      return body;
    } catch (e) {
      if (e instanceof ApiError) throw e;
      throw new ApiError(0, 0, `${path}: ${e.name === "AbortError" ? "timed out" : e.message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  checkpoint() {
    return this.get("/v1/log/checkpoint");
  }

  consistency(firstSize, secondSize) {
    return this.get("/v1/log/consistency", { first_size: firstSize, second_size: secondSize });
  }

  anchors(minSize = 0) {
    return this.get("/v1/log/anchors", { min_size: minSize });
  }

  receipt(receiptId) {
    return this.get(`/v1/receipts/${encodeURIComponent(receiptId)}`);
  }

  entries(startIndex, count) {
    return this.get("/v1/log/entries", { start_index: startIndex, count });
  }

  inclusion(leafIndex, treeSize) {
    return this.get(`/v1/log/inclusion/${leafIndex}`, { tree_size: treeSize });
  }

  model() {
    return this.get("/v1/model");
  }
}

// proto3 JSON readers: absent means the default value.
export const u64 = (v) => {
  if (v === undefined) return 0n;
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === "string" && /^(0|[1-9][0-9]{0,19})$/.test(v)) return BigInt(v);
  throw new ApiError(0, 0, "a 64-bit field is not an unsigned integer");
};
export const str = (v) => (v === undefined ? "" : typeof v === "string" ? v : (() => { throw new ApiError(0, 0, "a string field is not a string"); })());
export const list = (v) => (v === undefined ? [] : Array.isArray(v) ? v : (() => { throw new ApiError(0, 0, "a repeated field is not a list"); })());
