// The chosen model's swarm in a line (GET /api/v2/swarm): how many servers, whether every block
// is served, and in plain words what that means for answers when something is wrong. Hidden where
// the gateway has no swarm endpoint.

const DEFAULT_REFRESH_SECONDS = 30;

const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;
const ranges = (spans) => spans.map(([start, end]) => (end - start > 1 ? `${start}–${end - 1}` : `${start}`)).join(", ");

// The swarm's state as a summary line and a message in plain words (empty when all is well).
export function describeSwarm(swarm) {
  if (swarm.state === "unknown") return { summary: "The swarm's state is not known yet.", message: "" };
  const online = swarm.servers_by_state?.online ?? swarm.servers_total;
  const missing = swarm.blocks_without_server.reduce((count, [start, end]) => count + end - start, 0);
  const blocks = missing ? `${swarm.num_blocks - missing} of ${swarm.num_blocks} blocks served`
    : `all ${swarm.num_blocks} blocks served`;
  const summary = `${plural(online, "server")} online · ${blocks}`;
  const cacheLeft = swarm.min_block_cache_tokens_left ?? swarm.cache_tokens_left;
  let message = "";
  if (!swarm.full_route || missing) {
    message = `No server holds ${missing === 1 ? "block" : "blocks"} ${ranges(swarm.blocks_without_server)} of this model, `
      + "so it cannot answer right now. Wait for a server to join, or connect your GPU to serve them.";
  } else if (cacheLeft === 0) {
    message = "The swarm is out of capacity: its servers have no memory left for another conversation. Try again in a minute.";
  } else if (swarm.state === "degraded") {
    message = swarm.min_redundancy <= 1
      ? "Some blocks are held by a single server: answers may be slow, and stop if it leaves."
      : "The swarm is short of servers or memory: answers may be slow.";
  }
  return { summary, message };
}

export class SwarmView {
  constructor(section, summary, message, api) {
    Object.assign(this, { section, summary, message, api });
    this.model = null;
    this.timer = null;
  }

  watch(model) {
    if (model === this.model) return;
    this.model = model;
    clearTimeout(this.timer);
    this.refresh();
  }

  async refresh() {
    const model = this.model;
    const swarm = await this.api.swarm(model).catch(() => null);
    if (model !== this.model) return;
    this.section.hidden = !swarm;
    if (swarm) {
      const { summary, message } = describeSwarm(swarm);
      this.section.dataset.state = swarm.state;
      this.summary.textContent = summary;
      this.message.textContent = message;
    }
    const seconds = swarm?.refresh_seconds > 0 ? swarm.refresh_seconds : DEFAULT_REFRESH_SECONDS;
    this.timer = setTimeout(() => this.refresh(), seconds * 1000);
  }
}
