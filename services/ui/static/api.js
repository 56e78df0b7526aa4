// The gateway's API as the chat page uses it: the model list, inference sessions, the SSE answer
// stream and the swarm's state. The API key the user entered (if the gateway asked for one) is
// kept in localStorage and sent with every request (Authorization: Bearer).

const API_KEY_KEY = "petals-chat-api-key";
export const UNAUTHORIZED = "invalid_api_key";

export class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export function saveKey(key) {
  localStorage.setItem(API_KEY_KEY, key);
}

export function forgetKey() {
  localStorage.removeItem(API_KEY_KEY);
}

function authHeaders() {
  const key = localStorage.getItem(API_KEY_KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class Api {
  constructor(baseUrl) {
    this.baseUrl = baseUrl;
    this.controller = null; // aborts the answer being streamed
  }

  url(path) {
    return this.baseUrl + path;
  }

  // The entries of GET /v1/models (id, default, description, chat format, defaults, max_length).
  async models() {
    const response = await fetch(this.url("/v1/models"), { headers: authHeaders() });
    const body = await response.json().catch(() => ({}));
    const models = Array.isArray(body.data) ? body.data : [];
    if (response.status === 401) throw new ApiError(UNAUTHORIZED, body.error?.message || "This chat needs an API key.");
    if (!response.ok || !models.length) {
      throw new ApiError("no_model", body.error?.message || "No model is available right now; retry in a few seconds.");
    }
    return models;
  }

  async openSession(model, maxLength) {
    const query = `max_length=${maxLength}&model=${encodeURIComponent(model)}`;
    const response = await fetch(this.url(`/api/v1/open_inference_session?${query}`), { headers: authHeaders() });
    const body = await response.json();
    // v1 answers errors with HTTP 200; its header names the error (e.g. the key, or the session quota).
    if (!body.ok) throw new ApiError(response.headers.get("X-Petals-Chat-Error") || "open_failed", body.traceback);
    return body.session_id;
  }

  closeSession(sessionId) {
    // keepalive: the request completes even when the page is going away.
    const url = this.url(`/api/v1/close_inference_session?session_id=${encodeURIComponent(sessionId)}`);
    if (sessionId) fetch(url, { keepalive: true, headers: authHeaders() }).catch(() => {});
  }

  // Stream one answer; calls onToken(text, generatedTokens) and returns the `done` event.
  async stream(body, onToken) {
    this.controller = new AbortController();
    const response = await fetch(this.url("/api/v2/generate_stream"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: this.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new ApiError(error.error?.code || `http_${response.status}`, error.error?.message || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.name === "token") onToken(event.data.text, event.data.generated_tokens);
        else if (event.name === "done") return event.data;
        else if (event.name === "error") throw new ApiError(event.data.error.code, event.data.error.message);
      }
    }
    throw new ApiError("cut_off", "The answer was cut off before it finished.");
  }

  abort() {
    this.controller?.abort();
  }

  // The model's swarm (GET /api/v2/swarm), or null where the gateway has no such endpoint or refuses it.
  async swarm(model) {
    const response = await fetch(this.url(`/api/v2/swarm?model=${encodeURIComponent(model)}`), { headers: authHeaders() });
    return response.ok ? response.json() : null;
  }
}

function parseEvent(block) {
  const event = { name: "message", data: null };
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event.name = line.slice(7);
    else if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
  }
  return event;
}
