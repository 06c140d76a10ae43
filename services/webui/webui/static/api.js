// Calls to the services through this origin's /api proxy. Every service (and this server)
// answers errors in one shape, OpenAI's: {"error": {"message", "type", "param", "code"}}.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.param = param; // the request field at fault, as a dotted path ("options.depth"), or null
  }
}

// What a person should read for each way a call can fail.
function describe(status, code, message, service) {
  if (status === 0) return `Cannot reach the web UI server (${message}).`;
  if (code === "upstream_unavailable") return `The ${service} service is down or unreachable. Try again once it is back.`;
  if (code === "context_length_exceeded") return `This conversation is too long for the model's context: ${message} Start a new chat or edit an earlier message.`;
  if (status === 429) return "The server's queue is full.";
  if (status === 503 && service === "inference") return `No model is being served yet${message ? ` (${message})` : ""}.`;
  if (status === 401 || status === 403) return message || "You need to sign in for that.";
  return message || `Request failed with status ${status}.`;
}

async function toError(response, service) {
  let code = `http_${response.status}`;
  let message = "";
  let param = null;
  try {
    const { error } = await response.json();
    code = error.code || error.type || code;
    message = error.message || "";
    param = error.param ?? null;
  } catch {
    message = response.statusText; // not JSON: a proxy or server in between answered
  }
  const retry = Number.parseFloat(response.headers.get("retry-after"));
  return new ApiError(response.status, code, describe(response.status, code, message, service),
    Number.isFinite(retry) ? retry : null, param);
}

export async function request(path, { method = "GET", body, signal } = {}) {
  const service = path.split("/")[2] || "web UI";
  let response;
  try {
    response = await fetch(path, {
      method,
      signal,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", describe(0, "", err.message, service));
  }
  if (!response.ok) throw await toError(response, service);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

// Services answer lists either bare or wrapped ({"data": [...]}, {"jobs": [...]}).
export function listOf(body, ...keys) {
  if (Array.isArray(body)) return body;
  for (const key of [...keys, "data", "items"]) if (body && Array.isArray(body[key])) return body[key];
  return [];
}

// POSTs a streaming chat completion and calls onChunk with every parsed SSE chunk.
export async function streamChat(payload, signal, onChunk) {
  let response;
  try {
    response = await fetch("/api/inference/v1/chat/completions", {
      method: "POST",
      signal,
      headers: { "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify({ ...payload, stream: true, stream_options: { include_usage: true } }),
      credentials: "same-origin",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", describe(0, "", err.message, "inference"));
  }
  if (!response.ok) throw await toError(response, "inference");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let done = false;
  while (!done) {
    const { value, done: ended } = await reader.read();
    if (ended) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") { done = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.code || "stream_error", chunk.error.message || "The model stopped with an error.");
      onChunk(chunk);
    }
  }
  if (!done) throw new ApiError(0, "stream_cut", "The answer was cut off: the connection to the inference service ended early.");
}
