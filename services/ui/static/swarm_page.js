// The swarm's status page: each model's swarm (GET /api/v2/swarm), read again every refresh_seconds.
//
// Per model: its state, one bar per block coloured by its online servers (none, one, more), the
// block ranges without a server, the counts and the cache room, and the servers the API lists. With
// API keys on, a 401 asks for a key, kept in localStorage under the chat page's name (one key for both
// pages). Everything the API says is shown as text, never as HTML.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("swarm-config").textContent);
  const API_KEY_KEY = "petals-chat-api-key"; // the chat page's (services/ui/static/chat.js)
  const MIN_REFRESH_S = 1;
  const FAILED_RETRY_S = 5;
  const $ = (id) => document.getElementById(id);
  const ui = {
    models: $("models"), updated: $("updated"), error: $("error"), template: $("model-template"),
    keyForm: $("key-form"), keyMessage: $("key-message"), apiKey: $("api-key"),
  };
  let timer = null;

  function authHeaders() {
    const key = localStorage.getItem(API_KEY_KEY);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function load() {
    clearTimeout(timer);
    let next = FAILED_RETRY_S;
    try {
      const query = new URLSearchParams(location.search).get("model");
      const path = "/api/v2/swarm" + (query ? `?model=${encodeURIComponent(query)}` : "");
      const response = await fetch(config.apiBaseUrl + path, { headers: authHeaders(), cache: "no-store" });
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) {
        askForKey(body.error?.message || "The API needs a key.");
        return; // until a key is entered
      }
      if (!response.ok) throw new Error(body.error?.message || `The API answered ${response.status}`);
      const models = Array.isArray(body.models) ? body.models : [body];
      show(models);
      ui.error.hidden = true;
      const periods = models.map((model) => model.refresh_seconds).filter((s) => s > 0);
      next = Math.max(MIN_REFRESH_S, Math.min(...periods, FAILED_RETRY_S * 6));
    } catch (error) {
      ui.error.textContent = `Could not read the swarm's state: ${error.message}`;
      ui.error.hidden = false;
    }
    timer = setTimeout(load, next * 1000);
  }

  function show(models) {
    ui.models.replaceChildren(...models.map(modelSection));
    ui.updated.textContent = models.length ? `Read at ${new Date().toLocaleTimeString()}` : "No model is served yet.";
  }

  function modelSection(model) {
    const section = ui.template.content.firstElementChild.cloneNode(true);
    const part = (name) => section.querySelector(name);
    section.dataset.model = model.model;
    section.dataset.state = model.state;
    part(".name").textContent = model.model;
    part(".state").textContent = model.state;
    part(".state").classList.add(model.state);
    part(".summary").textContent = summary(model);
    const blocks = model.coverage.map((servers, index) => block(index, servers));
    part(".blocks").replaceChildren(...blocks);
    part(".blocks").setAttribute("aria-label", `Online servers per block: ${model.coverage.join(", ")}`);
    const gaps = model.blocks_without_server.map(([start, end]) => (end - start > 1 ? `${start}–${end - 1}` : `${start}`));
    part(".gaps").textContent = gaps.length ? `Blocks without a server: ${gaps.join(", ")}` : "";
    part(".servers tbody").replaceChildren(...model.servers.map(serverRow));
    const hidden = model.servers_total - model.servers.length;
    part(".more").textContent = model.servers_truncated ? `and ${hidden} more servers` : "";
    return section;
  }

  function summary(model) {
    const counts = model.servers_by_state;
    const parts = [
      `${model.num_blocks} blocks`,
      `${counts.online} server${counts.online === 1 ? "" : "s"} online, ${counts.joining} joining, ${counts.offline} offline`,
      `smallest redundancy ${model.min_redundancy}`,
    ];
    if (model.min_block_cache_tokens_left !== null) parts.push(`cache room ${model.min_block_cache_tokens_left} tokens`);
    parts.push(model.updated_at ? `updated ${new Date(model.updated_at).toLocaleTimeString()}` : "not read yet");
    return parts.join(" · ");
  }

  function block(index, servers) {
    const cell = document.createElement("div");
    cell.className = "block" + (servers === 0 ? " none" : servers === 1 ? " one" : "");
    cell.dataset.servers = String(servers);
    cell.title = `Block ${index}: ${servers} online server${servers === 1 ? "" : "s"}`;
    cell.textContent = String(servers);
    return cell;
  }

  function serverRow(server) {
    const row = document.createElement("tr");
    row.className = server.state;
    const cells = [
      server.peer_id,
      `${server.start_block}:${server.end_block}`,
      server.state,
      server.throughput === null ? "–" : server.throughput.toFixed(1),
      server.cache_tokens_left === null ? "–" : String(sessionTokensLeft(server)),
      server.version ?? "–",
    ];
    row.replaceChildren(...cells.map((text, index) => {
      const cell = document.createElement("td");
      if (index === 0) cell.className = "peer";
      cell.textContent = text;
      return cell;
    }));
    return row;
  }

  // Petals announces cache room as keys and values of one block: a session token takes 2 per block held
  // (services/common/api/swarm_state.py, session_tokens_left).
  function sessionTokensLeft(server) {
    return Math.floor(server.cache_tokens_left / (2 * Math.max(1, server.end_block - server.start_block)));
  }

  function askForKey(message) {
    localStorage.removeItem(API_KEY_KEY);
    ui.keyMessage.textContent = message;
    ui.keyForm.hidden = false;
    ui.apiKey.focus();
  }

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.apiKey.value.trim();
    if (!key) return;
    localStorage.setItem(API_KEY_KEY, key);
    ui.apiKey.value = "";
    ui.keyForm.hidden = true;
    load();
  });

  load();
})();
