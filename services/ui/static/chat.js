// Petals Chat page: conversations kept in this browser, answers streamed token by token from the
// gateway's SSE endpoint.
//
// The models come from the gateway's GET /v1/models, each with its card: description, chat format
// (how turns are written, what ends an answer) and default settings. One inference session per
// conversation on screen: the first request sends the whole transcript of the branch shown, later
// ones only the new turn. When the session no longer holds the branch (another conversation, an
// edit, a regenerated answer, another version, a changed system prompt) or the gateway says it
// expired, a new session is opened and the branch replayed, without bothering the user. When the
// gateway wants an API key (401), the page asks for one.

import { Api, UNAUTHORIZED, forgetKey, saveKey } from "./api.js";
import { DialogueView } from "./dialogue.js";
import { continuation, nextTurn, transcript } from "./prompt.js";
import { SettingsForm, modelDefaults, newSettings } from "./settings.js";
import { Sidebar } from "./sidebar.js";
import { deleteConversation, listConversations, saveConversation } from "./store.js";
import { SwarmView } from "./swarm.js";
import { exportFile, parseFile } from "./transfer.js";
import { activePath, addMessage, newConversation, showBranch, siblingIds } from "./tree.js";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const SLOW_SECONDS_PER_TOKEN = 3;
const WIDE_SCREEN = window.matchMedia("(min-width: 48rem)");

const $ = (id) => document.getElementById(id);
const ui = {
  dialogue: $("dialogue"), composer: $("composer"), message: $("message"), send: $("send"),
  stop: $("stop"), newChat: $("new-chat"), speed: $("speed"), slowHint: $("slow-hint"),
  error: $("error"), errorMessage: $("error-message"), retry: $("retry"), settings: $("settings"),
  model: $("model"), modelDescription: $("model-description"), resetSettings: $("reset-settings"),
  keyForm: $("key-form"), keyMessage: $("key-message"), apiKey: $("api-key"),
  toggleSidebar: $("toggle-sidebar"), search: $("search"), exportButton: $("export"), importFile: $("import-file"),
  transferMessage: $("transfer-message"), shortcuts: $("shortcuts"),
};

const api = new Api(config.apiBaseUrl);
const view = new DialogueView(ui.dialogue);
const swarmView = new SwarmView($("swarm"), $("swarm-summary"), $("swarm-message"), api);
const settingsForm = new SettingsForm(ui.settings, $("model-defaults"), (settings) => {
  state.conversation.settings = settings;
  persist();
});
const sidebar = new Sidebar($("conversations"), ui.search, {
  open: (id) => openConversation(state.conversations.find((c) => c.id === id)),
  rename: (id, title) => {
    const conversation = state.conversations.find((c) => c.id === id);
    conversation.title = title;
    persist(conversation, false);
  },
  remove: (id) => removeConversation(id),
});

const state = {
  models: new Map(), // id -> entry of GET /v1/models
  conversations: [], // kept in IndexedDB, newest first
  conversation: null, // the one on screen
  session: null, // {id, holds, length}: `holds` names the dialogue it has seen (sessionKey)
  sessionLength: config.sessionMaxLength,
  busy: false,
  stopped: false,
  generation: 0, // bumped when another conversation is shown: late results of an answer are dropped
};

const model = () => state.models.get(state.conversation.model);
const format = () => model().chat;

// ---- conversations -------------------------------------------------------------------------
async function persist(conversation = state.conversation, touch = true) {
  if (!conversation.roots.length) return; // an empty chat is kept only once it has a message
  if (touch) conversation.updatedAt = Date.now();
  if (!state.conversations.includes(conversation)) state.conversations.unshift(conversation);
  state.conversations.sort((a, b) => b.updatedAt - a.updatedAt);
  sidebar.show(state.conversations, state.conversation.id);
  await saveConversation(conversation);
}

function defaultModelId() {
  return [...state.models.values()].find((m) => m.default)?.id ?? state.models.keys().next().value;
}

function showConversation(conversation) {
  stopAnswer();
  dropSession();
  state.generation += 1;
  setBusy(false);
  if (!state.models.has(conversation.model)) conversation.model = defaultModelId();
  state.conversation = conversation;
  ui.model.value = conversation.model;
  ui.modelDescription.textContent = model().description;
  state.sessionLength = Math.min(config.sessionMaxLength, model().max_length);
  settingsForm.show(conversation.settings, model());
  swarmView.watch(conversation.model);
  view.show(conversation, activePath(conversation));
  sidebar.show(state.conversations, conversation.id);
  ui.speed.hidden = ui.slowHint.hidden = true;
  hideError();
}

function openConversation(conversation) {
  showConversation(conversation);
  if (!WIDE_SCREEN.matches) setSidebar(false);
  ui.message.focus();
}

function newChat(modelId = state.conversation?.model ?? defaultModelId()) {
  showConversation(newConversation(modelId, newSettings(state.models.get(modelId))));
  ui.message.focus();
}

async function removeConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.conversation.id === id) newChat(); // shown at once; the store catches up
  else sidebar.show(state.conversations, state.conversation.id);
  await deleteConversation(id);
}

// ---- the session: which dialogue it holds ---------------------------------------------------
function sessionKey(messages) {
  const { system_prompt: system } = state.conversation.settings;
  return JSON.stringify([state.conversation.model, system, messages.map((m) => m.id)]);
}

function setSession(session) {
  state.session = session;
  document.body.dataset.sessionId = session?.id || "";
}

function dropSession() {
  if (state.session) api.closeSession(state.session.id);
  setSession(null);
}

// ---- answers ------------------------------------------------------------------------------
function showSpeed(tokens, startedAt) {
  const seconds = (performance.now() - startedAt) / 1000;
  const perToken = seconds / tokens;
  ui.speed.textContent = `${(tokens / seconds).toFixed(1)} tokens/s · ${perToken.toFixed(2)} s/token`;
  ui.speed.hidden = false;
  ui.slowHint.hidden = perToken <= SLOW_SECONDS_PER_TOKEN;
}

function requestBody(inputs) {
  const settings = state.conversation.settings;
  const body = {
    model: state.conversation.model, session_id: state.session.id, inputs,
    max_new_tokens: settings.max_new_tokens, stop: format().stop,
  };
  return Object.assign(body, settings.sampling
    ? { do_sample: 1, temperature: settings.temperature, top_p: settings.top_p }
    : { do_sample: 0 });
}

// The answer to the branch `path` (ending with a question), streamed into `pending`.
async function generate(path, pending) {
  const before = sessionKey(path.slice(0, -1));
  let replayed = false;
  for (;;) {
    let inputs;
    if (state.session?.holds === before) {
      inputs = nextTurn(format(), state.session.continuation, path.at(-1).text);
    } else {
      dropSession();
      setSession({ id: await api.openSession(state.conversation.model, state.sessionLength) });
      inputs = transcript(format(), state.conversation.settings.system_prompt, path);
    }
    const startedAt = performance.now();
    let text = "";
    try {
      const done = await api.stream(requestBody(inputs), (token, tokens) => {
        text += token;
        pending.update(text);
        showSpeed(tokens, startedAt);
      });
      state.session.continuation = continuation(format(), done);
      return done.outputs;
    } catch (error) {
      if (state.stopped) return text; // Stop: keep what was shown
      const full = error.code === "session_full";
      if (replayed || !(error.code === "session_not_found" || full)) throw error;
      // The session is gone (expired, replica lost) or too small: a new one, and replay.
      replayed = true;
      if (full) state.sessionLength = Math.min(2 * state.sessionLength, model().max_length);
      setSession(null);
    }
  }
}

async function answer() {
  const conversation = state.conversation;
  const path = activePath(conversation);
  if (!path.length || path.at(-1).role !== "human") return;
  hideError();
  setBusy(true);
  state.stopped = false;
  const generation = state.generation;
  const pending = view.startAnswer();
  try {
    const text = await generate(path, pending);
    if (generation !== state.generation) return;
    const message = addMessage(conversation, path.at(-1).id, "ai", text);
    if (state.stopped) dropSession(); // the next turn replays into a new session
    else state.session.holds = sessionKey([...path, message]);
    pending.remove();
    view.show(conversation, activePath(conversation));
    await persist(conversation);
  } catch (error) {
    pending.remove();
    if (generation !== state.generation) return; // another conversation is shown now
    dropSession(); // its state is unknown now: the retry replays into a new one
    showError(error.message || String(error));
    if (error.code === UNAUTHORIZED) askForKey(error.message);
  } finally {
    if (generation === state.generation) setBusy(false);
  }
}

function ask(parentId, text) {
  addMessage(state.conversation, parentId, "human", text);
  view.show(state.conversation, activePath(state.conversation));
  persist();
  answer();
}

function submit() {
  const text = ui.message.value.trim();
  if (!text || state.busy || !state.conversation) return;
  ui.message.value = "";
  ask(state.conversation.leaf, text);
}

function stopAnswer() {
  if (!state.busy) return;
  state.stopped = true;
  api.abort(); // the answer ends, keeping what was shown
  dropSession(); // the server stops at once
}

function setBusy(busy) {
  state.busy = busy;
  document.body.classList.toggle("busy", busy);
  ui.message.disabled = busy;
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  for (const button of ui.dialogue.querySelectorAll(".message-actions button")) button.disabled ||= busy;
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
  forgetKey();
  ui.keyMessage.textContent = message;
  ui.keyForm.hidden = false;
  ui.apiKey.focus();
}

// ---- message actions: copy, edit, regenerate, switch versions -------------------------------
function regenerate(id) {
  const conversation = state.conversation;
  conversation.leaf = conversation.messages[id].parent; // the new answer becomes a sibling of this one
  view.show(conversation, activePath(conversation));
  answer();
}

async function edit(id) {
  const text = await view.editQuestion(id);
  if (text === null) return view.show(state.conversation, activePath(state.conversation));
  ask(state.conversation.messages[id].parent, text);
}

function switchVersion(id, step) {
  const conversation = state.conversation;
  const ids = siblingIds(conversation, conversation.messages[id]);
  showBranch(conversation, ids[ids.indexOf(id) + step]);
  view.show(conversation, activePath(conversation));
  persist(conversation, false);
}

async function copy(text, button) {
  await navigator.clipboard.writeText(text);
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1500);
}

ui.dialogue.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button || button.disabled) return;
  if (button.classList.contains("copy-code")) return copy(button.nextElementSibling.textContent, button);
  const id = button.closest(".turn")?.dataset.id;
  if (!id || state.busy) return;
  const message = state.conversation.messages[id];
  const actions = {
    copy: () => copy(message.text, button),
    edit: () => edit(id),
    regenerate: () => regenerate(id),
    previous: () => switchVersion(id, -1),
    next: () => switchVersion(id, 1),
  };
  actions[button.dataset.action]?.();
});

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

ui.stop.addEventListener("click", stopAnswer);

ui.retry.addEventListener("click", () => {
  if (!state.models.size) return start();
  answer();
});

ui.newChat.addEventListener("click", () => newChat());

ui.resetSettings.addEventListener("click", () => {
  state.conversation.settings = modelDefaults(model());
  settingsForm.show(state.conversation.settings, model());
  persist();
});

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  saveKey(key);
  ui.apiKey.value = "";
  ui.keyForm.hidden = true;
  if (!state.models.size) start();
  else if (!ui.error.hidden) ui.retry.click(); // the message the key was missing for, again
});

ui.model.addEventListener("change", () => {
  // A dialogue is written in one model's format: another model starts a new chat.
  if (state.conversation.roots.length) return newChat(ui.model.value);
  state.conversation.model = ui.model.value;
  state.conversation.settings = newSettings(model());
  showConversation(state.conversation);
});

ui.exportButton.addEventListener("click", () => exportFile(state.conversations));

ui.importFile.addEventListener("change", async () => {
  const file = ui.importFile.files[0];
  ui.importFile.value = "";
  try {
    const imported = parseFile(await file.text());
    for (const conversation of imported) await saveConversation(conversation);
    state.conversations = await listConversations();
    sidebar.show(state.conversations, state.conversation.id);
    ui.transferMessage.textContent = `Imported ${imported.length} conversation(s).`;
  } catch (error) {
    ui.transferMessage.textContent = error.message;
  }
});

function setSidebar(open) {
  document.body.classList.toggle("sidebar-closed", !open);
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
}

ui.toggleSidebar.addEventListener("click", () => setSidebar(document.body.classList.contains("sidebar-closed")));
WIDE_SCREEN.addEventListener("change", () => setSidebar(WIDE_SCREEN.matches));

$("show-shortcuts").addEventListener("click", () => ui.shortcuts.showModal());
$("close-shortcuts").addEventListener("click", () => ui.shortcuts.close());

const SHORTCUTS = {
  "ctrl+shift+o": () => newChat(),
  "ctrl+k": () => {
    setSidebar(true);
    ui.search.focus();
  },
  "ctrl+shift+l": () => ui.toggleSidebar.click(),
  "ctrl+shift+enter": () => {
    const last = activePath(state.conversation).at(-1);
    if (last?.role === "ai" && !state.busy) regenerate(last.id);
  },
  "ctrl+/": () => ui.shortcuts.showModal(),
  escape: () => stopAnswer(),
};

document.addEventListener("keydown", (event) => {
  const name = [event.ctrlKey || event.metaKey ? "ctrl" : "", event.shiftKey ? "shift" : "", event.key.toLowerCase()]
    .filter(Boolean).join("+");
  const action = SHORTCUTS[name];
  if (!action || (name === "escape" && !state.busy) || !state.conversation) return;
  event.preventDefault();
  action();
});

// Leaving the page frees the session's attention caches on the swarm at once.
window.addEventListener("pagehide", () => dropSession());

async function start() {
  hideError();
  try {
    const models = await api.models();
    state.models = new Map(models.map((entry) => [entry.id, entry]));
    ui.model.replaceChildren(...models.map((entry) => new Option(entry.id, entry.id, entry.default, entry.default)));
  } catch (error) {
    if (error.code === UNAUTHORIZED) askForKey(error.message);
    else showError(error.message || String(error));
    return;
  }
  state.conversations = await listConversations().catch(() => []);
  if (state.conversations.length) showConversation(state.conversations[0]);
  else newChat(defaultModelId());
  ui.model.disabled = false; // the page is ready
  ui.message.focus();
}

setSidebar(WIDE_SCREEN.matches);
setSession(null);
ui.message.focus();
start();
