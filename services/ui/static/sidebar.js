// The list of conversations: newest first, filtered by the search box; open, rename, delete.

import { searchText } from "./tree.js";

function button(text, className, label) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  if (label) element.setAttribute("aria-label", label);
  return element;
}

export class Sidebar {
  // actions: { open(id), rename(id, title), remove(id) }
  constructor(list, search, actions) {
    this.list = list;
    this.search = search;
    this.actions = actions;
    this.conversations = [];
    this.currentId = null;
    search.addEventListener("input", () => this.render());
  }

  show(conversations, currentId) {
    this.conversations = conversations;
    this.currentId = currentId;
    this.render();
  }

  render() {
    const query = this.search.value.trim().toLowerCase();
    const shown = this.conversations.filter((c) => !query || searchText(c).includes(query));
    this.list.replaceChildren(...shown.map((c) => this.item(c)));
  }

  item(conversation) {
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = conversation.id;
    const open = button(conversation.title, "conversation-title");
    if (conversation.id === this.currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => this.actions.open(conversation.id));
    const rename = button("✎", "secondary icon rename", `Rename “${conversation.title}”`);
    rename.addEventListener("click", () => this.editTitle(item, conversation));
    const remove = button("✕", "secondary icon delete", `Delete “${conversation.title}”`);
    remove.addEventListener("click", () => this.actions.remove(conversation.id));
    item.append(open, rename, remove);
    return item;
  }

  editTitle(item, conversation) {
    const input = document.createElement("input");
    input.className = "rename-input";
    input.value = conversation.title;
    input.setAttribute("aria-label", "New name");
    let finished = false; // Enter, then the blur of the input it removes: once
    const finish = (save) => {
      if (finished) return;
      finished = true;
      const title = input.value.trim();
      if (save && title) this.actions.rename(conversation.id, title);
      else this.render();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      else if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true), { once: true });
    item.replaceChildren(input);
    input.focus();
    input.select();
  }
}
