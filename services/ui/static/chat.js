// Petals Chat page: a dialogue streamed token by token from the gateway's SSE endpoint.
//
// The models come from the gateway's GET /v1/models, each with its card: description, chat format
// (how turns are written, what ends an answer) and default settings. Switching models starts a new
// chat. One inference session per dialogue: the first request sends the whole transcript, later
// ones only the new turn. When the gateway says the session expired (or its replica is gone), a
// new session is opened and the dialogue replayed, once, without bothering the user. Every text
// from the user, the model or a model card is shown as text (textContent), never as markup. When
// the gateway wants an API key (401), the page asks for one, keeps it in localStorage and sends it
// with every request (Authorization: Bearer).
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("chat-config").textContent);
  const SETTINGS_KEY = "petals-chat-settings";
  const API_KEY_KEY = "petals-chat-api-key";
  const UNAUTHORIZED = "invalid_api_key";
  const FALLBACK = { sampling: true, temperature: 0.75, top_p: 0.9, max_new_tokens: 256 };
  const SLOW_SECONDS_PER_TOKEN = 3;

  const $ = (id) => document.getElementById(id);
  const ui = {
    dialogue: $("dialogue"), composer: $("composer"), message: $("message"), send: $("send"),
    stop: $("stop"), newChat: $("new-chat"), speed: $("speed"), slowHint: $("slow-hint"),
    error: $("error"), errorMessage: $("error-message"), retry: $("retry"), settings: $("settings"),
    model: $("model"), modelDescription: $("model-description"),
    keyForm: $("key-form"), keyMessage: $("key-message"), apiKey: $("api-key"),
  };

  class ApiError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  const state = {
    models: new Map(), // id -> entry of GET /v1/models
    model: null, // the chosen entry
    sessionId: null,
    sessionLength: config.sessionMaxLength,
    continuation: "", // what must precede the next turn in the current session
    turns: [], // {role: "human" | "ai", text}
    controller: null,
    stopped: false,
    dialogue: 0, // bumped by "New chat": late results of an older dialogue are dropped
  };

  // ---- settings, kept across reloads (what the user never set: the model's defaults) ------
  function defaults() {
    const d = state.model?.defaults;
    return d ? { sampling: d.do_sample, temperature: d.temperature, top_p: d.top_p, max_new_tokens: d.max_new_tokens }
      : { ...FALLBACK };
  }

  function loadSettings() {
    try {
      return { ...defaults(), ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
    } catch {
      return defaults();
    }
  }

  function showSettings(settings) {
    ui.settings.sampling.checked = settings.sampling;
    for (const name of ["temperature", "top_p", "max_new_tokens"]) ui.settings[name].value = settings[name];
  }

  function readSettings() {
    const number = (name) => {
      const input = ui.settings[name];
      const value = Number(input.value);
      const ok = input.value !== "" && Number.isFinite(value) && value >= Number(input.min) && value <= Number(input.max);
      return ok ? value : defaults()[name];
    };
    return {
      sampling: ui.settings.sampling.checked,
      temperature: number("temperature"),
      top_p: number("top_p"),
      max_new_tokens: Math.round(number("max_new_tokens")),
    };
  }

  ui.settings.addEventListener("change", () => localStorage.setItem(SETTINGS_KEY, JSON.stringify(readSettings())));

  // ---- the API ---------------------------------------------------------------------------
  const api = (path) => config.apiBaseUrl + path;

  // The API key the user entered (none: the API is open, or not asked for yet).
  function authHeaders() {
    const key = localStorage.getItem(API_KEY_KEY);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function loadModels() {
    const response = await fetch(api("/v1/models"), { headers: authHeaders() });
    const body = await response.json().catch(() => ({}));
    const models = Array.isArray(body.data) ? body.data : [];
    if (response.status === 401) throw new ApiError(UNAUTHORIZED, body.error?.message || "This chat needs an API key.");
    if (!response.ok || !models.length) {
      throw new ApiError("no_model", body.error?.message || "No model is available right now; retry in a few seconds.");
    }
    state.models = new Map(models.map((entry) => [entry.id, entry]));
    ui.model.replaceChildren(...models.map((entry) => new Option(entry.id, entry.id, entry.default, entry.default)));
    ui.model.disabled = false;
    chooseModel(ui.model.value);
  }

  function chooseModel(id) {
    state.model = state.models.get(id);
    state.sessionLength = Math.min(config.sessionMaxLength, state.model.max_length);
    ui.modelDescription.textContent = state.model.description;
    showSettings(loadSettings());
  }

  async function openSession(maxLength) {
    const query = `max_length=${maxLength}&model=${encodeURIComponent(state.model.id)}`;
    const response = await fetch(api(`/api/v1/open_inference_session?${query}`), { headers: authHeaders() });
    const body = await response.json();
    // v1 answers errors with HTTP 200; its header names the error (e.g. the key, or the session quota).
    if (!body.ok) throw new ApiError(response.headers.get("X-Petals-Chat-Error") || "open_failed", body.traceback);
    return body.session_id;
  }

  function closeSession(sessionId) {
    // keepalive: the request completes even when the page is going away.
    const url = api(`/api/v1/close_inference_session?session_id=${encodeURIComponent(sessionId)}`);
    if (sessionId) fetch(url, { keepalive: true, headers: authHeaders() }).catch(() => {});
  }

  function setSession(sessionId) {
    state.sessionId = sessionId;
    document.body.dataset.sessionId = sessionId || "";
  }

  function dropSession() {
    closeSession(state.sessionId);
    setSession(null);
  }

  // Stream one answer; calls onToken(text, generatedTokens) and returns the `done` event.
  async function streamAnswer(body, onToken) {
    state.controller = new AbortController();
    const response = await fetch(api("/api/v2/generate_stream"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: state.controller.signal,
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

  function parseEvent(block) {
    const event = { name: "message", data: null };
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) event.name = line.slice(7);
      else if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
    }
    return event;
  }

  // ---- the dialogue, in the chosen model's chat format -------------------------------------
  const chat = () => state.model.chat;

  function turnText(turn) {
    const f = chat();
    return turn.role === "human" ? f.user_start + turn.text + f.user_end : f.assistant_start + turn.text + f.assistant_end;
  }

  // The whole dialogue (its last turn the user's), for a new session.
  function transcript() {
    const f = chat();
    const system = f.system_prompt ? f.system_start + f.system_prompt + f.system_end : "";
    return system + state.turns.map(turnText).join("") + f.assistant_start;
  }

  // What must precede the next user message in the session: the end of the answer and the start of
  // the user's turn, less what the model already said (the stop sequence, or its end-of-turn token).
  function continuation(done) {
    const f = chat();
    const between = f.assistant_end + f.user_start;
    const said = { stop: done.stop_sequence, eos: f.end_of_turn }[done.finish_reason] || "";
    return said && between.startsWith(said) ? between.slice(said.length) : between;
  }

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "human" ? "You" : "AI";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    ui.dialogue.append(item);
    item.scrollIntoView({ block: "end" });
    return { item, body };
  }

  function showSpeed(tokens, startedAt) {
    const seconds = (performance.now() - startedAt) / 1000;
    const perToken = seconds / tokens;
    ui.speed.textContent = `${(tokens / seconds).toFixed(1)} tokens/s · ${perToken.toFixed(2)} s/token`;
    ui.speed.hidden = false;
    ui.slowHint.hidden = perToken <= SLOW_SECONDS_PER_TOKEN;
  }

  async function generate(humanText, view) {
    const settings = readSettings();
    let replayed = false;
    for (;;) {
      let inputs;
      if (!state.sessionId) {
        setSession(await openSession(state.sessionLength));
        inputs = transcript();
      } else {
        inputs = state.continuation + humanText + chat().user_end + chat().assistant_start;
      }
      const body = {
        model: state.model.id, session_id: state.sessionId, inputs, max_new_tokens: settings.max_new_tokens,
        stop: chat().stop,
      };
      Object.assign(body, settings.sampling
        ? { do_sample: 1, temperature: settings.temperature, top_p: settings.top_p }
        : { do_sample: 0 });
      view.body.textContent = "";
      const startedAt = performance.now();
      try {
        const done = await streamAnswer(body, (text, tokens) => {
          view.body.textContent += text;
          showSpeed(tokens, startedAt);
        });
        view.body.textContent = done.outputs;
        state.continuation = continuation(done);
        return done.outputs;
      } catch (error) {
        const full = error.code === "session_full";
        if (replayed || !(error.code === "session_not_found" || full)) throw error;
        // The session is gone (expired, replica lost) or too small: a new one, and replay.
        replayed = true;
        if (full) state.sessionLength = Math.min(2 * state.sessionLength, state.model.max_length);
        setSession(null);
      }
    }
  }

  async function answer(humanText) {
    hideError();
    setBusy(true);
    const view = addTurn("ai", "");
    view.item.classList.add("streaming");
    state.stopped = false;
    const dialogue = state.dialogue;
    try {
      const text = await generate(humanText, view);
      state.turns.push({ role: "ai", text });
    } catch (error) {
      if (dialogue !== state.dialogue) return; // "New chat" was pressed meanwhile
      if (state.stopped) {
        state.turns.push({ role: "ai", text: view.body.textContent }); // keep what was shown
      } else {
        view.item.remove();
        dropSession(); // its state is unknown now: the retry replays into a new one
        showError(error.message || String(error));
        if (error.code === UNAUTHORIZED) askForKey(error.message);
      }
    } finally {
      view.item.classList.remove("streaming");
      setBusy(false);
    }
  }

  function submit() {
    const text = ui.message.value.trim();
    if (!text || ui.send.disabled || !state.model) return;
    ui.message.value = "";
    state.turns.push({ role: "human", text });
    addTurn("human", text);
    answer(text);
  }

  function setBusy(busy) {
    ui.message.disabled = busy;
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    if (!busy) ui.message.focus();
  }

  function showError(message) {
    ui.errorMessage.textContent = message;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
  }

  // The gateway wants a key (none was sent, or it is not valid): ask for one.
  function askForKey(message) {
    localStorage.removeItem(API_KEY_KEY);
    ui.keyMessage.textContent = message;
    ui.keyForm.hidden = false;
    ui.apiKey.focus();
  }

  function lastHumanText() {
    for (let i = state.turns.length - 1; i >= 0; i--) if (state.turns[i].role === "human") return state.turns[i].text;
    return null;
  }

  // ---- controls --------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });

  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });

  ui.stop.addEventListener("click", () => {
    state.stopped = true;
    state.controller?.abort();
    dropSession(); // the server stops at once; the next turn replays into a new session
  });

  ui.retry.addEventListener("click", () => {
    if (!state.model) return start();
    const text = lastHumanText();
    if (text !== null) answer(text);
  });

  function newChat() {
    state.stopped = true;
    state.controller?.abort();
    dropSession();
    state.dialogue += 1;
    state.turns = [];
    state.continuation = "";
    ui.dialogue.replaceChildren();
    ui.speed.hidden = ui.slowHint.hidden = true;
    hideError();
    ui.message.focus();
  }

  ui.newChat.addEventListener("click", newChat);

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.apiKey.value.trim();
    if (!key) return;
    localStorage.setItem(API_KEY_KEY, key);
    ui.apiKey.value = "";
    ui.keyForm.hidden = true;
    if (!state.model) start();
    else if (!ui.error.hidden) ui.retry.click(); // the message the key was missing for, again
  });

  ui.model.addEventListener("change", () => {
    newChat(); // a dialogue is written in one model's format: another model starts afresh
    chooseModel(ui.model.value);
  });

  // Leaving the page frees the session's attention caches on the swarm at once.
  window.addEventListener("pagehide", () => dropSession());

  function start() {
    hideError();
    loadModels().catch((error) => {
      if (error.code === UNAUTHORIZED) askForKey(error.message);
      else showError(error.message || String(error));
    });
  }

  showSettings(loadSettings());
  setSession(null);
  ui.message.focus();
  start();
})();
