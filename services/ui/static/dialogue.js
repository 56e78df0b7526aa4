// The conversation on screen: the messages of the branch shown, each with its actions (copy;
// edit a question, regenerate an answer; switch between alternatives), and the answer being
// streamed. User messages are text; answers are rendered Markdown (markdown.js). Every button
// carries data-action and its message's id; chat.js handles them.

import { renderMarkdown } from "./markdown.js";
import { siblingIds } from "./tree.js";

function actionButton(action, text, label, className = "secondary small") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.dataset.action = action;
  button.textContent = text;
  button.setAttribute("aria-label", label);
  return button;
}

function setText(body, role, text, final) {
  body.dataset.source = text;
  if (role === "human") body.textContent = text;
  else body.replaceChildren(renderMarkdown(text, final));
}

function messageItem(role) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "human" ? "You" : "AI";
  const body = document.createElement("div");
  body.className = "text";
  item.append(who, body);
  return { item, body };
}

function actions(conversation, message) {
  const bar = document.createElement("div");
  bar.className = "message-actions";
  const ids = siblingIds(conversation, message);
  if (ids.length > 1) {
    const index = ids.indexOf(message.id);
    const position = document.createElement("span");
    position.className = "branch-position";
    position.textContent = `${index + 1} / ${ids.length}`;
    const previous = actionButton("previous", "‹", "Previous version");
    const next = actionButton("next", "›", "Next version");
    previous.disabled = index === 0;
    next.disabled = index === ids.length - 1;
    bar.append(previous, position, next);
  }
  bar.append(actionButton("copy", "Copy", message.role === "human" ? "Copy question" : "Copy answer"));
  bar.append(message.role === "human" ? actionButton("edit", "Edit", "Edit question")
    : actionButton("regenerate", "Regenerate", "Regenerate answer"));
  return bar;
}

export class DialogueView {
  constructor(list) {
    this.list = list;
    this.pending = null; // the answer being streamed: {item, body, text, frame}
  }

  show(conversation, messages) {
    this.list.replaceChildren(...messages.map((message) => {
      const { item, body } = messageItem(message.role);
      item.dataset.id = message.id;
      setText(body, message.role, message.text, true);
      item.append(actions(conversation, message));
      return item;
    }));
    this.list.lastElementChild?.scrollIntoView({ block: "end" });
  }

  // An answer being written; `update(text)` shows it as it grows (at most once a frame).
  startAnswer() {
    const pending = { ...messageItem("ai"), text: "", frame: 0 };
    pending.item.classList.add("streaming");
    this.list.append(pending.item);
    pending.item.scrollIntoView({ block: "end" });
    this.pending = pending;
    return {
      update: (text) => {
        pending.text = text;
        pending.body.dataset.source = text;
        pending.frame ||= requestAnimationFrame(() => {
          pending.frame = 0;
          setText(pending.body, "ai", pending.text, false);
          pending.item.scrollIntoView({ block: "end" });
        });
      },
      remove: () => {
        cancelAnimationFrame(pending.frame);
        pending.item.remove();
      },
    };
  }

  // The question of message `id` as an editor; resolves with the new text, or null if cancelled.
  editQuestion(id) {
    const item = this.list.querySelector(`[data-id="${id}"]`);
    const body = item.querySelector(".text");
    const editor = document.createElement("form");
    editor.className = "edit-form";
    const field = document.createElement("textarea");
    field.value = body.dataset.source;
    field.setAttribute("aria-label", "Edited question");
    field.rows = 3;
    const send = actionButton("save-edit", "Send", "Send edited question", "small");
    send.type = "submit";
    const cancel = actionButton("cancel-edit", "Cancel", "Cancel editing", "secondary small");
    editor.append(field, send, cancel);
    body.replaceWith(editor);
    item.querySelector(".message-actions").hidden = true;
    field.focus();
    return new Promise((resolve) => {
      editor.addEventListener("submit", (event) => {
        event.preventDefault();
        resolve(field.value.trim() || null);
      });
      cancel.addEventListener("click", () => resolve(null));
      field.addEventListener("keydown", (event) => {
        if (event.key === "Escape") resolve(null);
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          editor.requestSubmit();
        }
      });
    });
  }
}
