// A conversation: its messages form a tree (an edited question or a regenerated answer is a new
// sibling, the old one is kept), and `leaf` names the end of the branch on screen.
//
// { id, title, createdAt, updatedAt, model, settings, messages: {id: {id, parent, role, text,
//   children, active}}, roots: [id], leaf }

export function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

export function newConversation(model, settings) {
  const now = Date.now();
  return { id: newId(), title: "New chat", createdAt: now, updatedAt: now, model, settings, messages: {}, roots: [], leaf: null };
}

// A new message after `parentId` (null: a first message), which becomes the branch on screen.
export function addMessage(conversation, parentId, role, text) {
  const message = { id: newId(), parent: parentId, role, text, children: [], active: null };
  conversation.messages[message.id] = message;
  siblingIds(conversation, message).push(message.id);
  if (parentId) conversation.messages[parentId].active = message.id;
  conversation.leaf = message.id;
  if (conversation.title === "New chat" && role === "human") conversation.title = text.slice(0, 60);
  return message;
}

// The messages on screen, first to last.
export function activePath(conversation) {
  const path = [];
  for (let id = conversation.leaf; id; id = conversation.messages[id].parent) path.push(conversation.messages[id]);
  return path.reverse();
}

// The ids of a message and its alternatives, in the order they were written.
export function siblingIds(conversation, message) {
  return message.parent ? conversation.messages[message.parent].children : conversation.roots;
}

// Show the branch through message `id`, down to the answers last seen below it.
export function showBranch(conversation, id) {
  let message = conversation.messages[id];
  if (message.parent) conversation.messages[message.parent].active = id;
  while (message.children.length) {
    const next = message.children.includes(message.active) ? message.active : message.children.at(-1);
    message = conversation.messages[next];
  }
  conversation.leaf = message.id;
}

// Every text of a conversation, for the search.
export function searchText(conversation) {
  return [conversation.title, ...Object.values(conversation.messages).map((message) => message.text)].join("\n").toLowerCase();
}
