// Conversations as a JSON file: export all of them, import a file exported here (checked first:
// an imported conversation is shown, so every field must have the shape the page expects).

const FORMAT = "petals-chat-conversations";

export function exportFile(conversations) {
  const json = JSON.stringify({ format: FORMAT, version: 1, conversations }, null, 1);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([json], { type: "application/json" }));
  link.download = `petals-chat-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const isString = (value) => typeof value === "string";
const isIdList = (value, messages) => Array.isArray(value) && value.every((id) => isString(id) && id in messages);

function validMessage(message, id, messages) {
  return message && message.id === id && ["human", "ai"].includes(message.role) && isString(message.text)
    && (message.parent === null || message.parent in messages) && isIdList(message.children, messages);
}

function validConversation(c) {
  if (!c || !isString(c.id) || !isString(c.title) || !isString(c.model) || !c.messages || typeof c.messages !== "object") {
    return false;
  }
  const messages = c.messages;
  return Object.entries(messages).every(([id, message]) => validMessage(message, id, messages))
    && isIdList(c.roots, messages) && (c.leaf === null || c.leaf in messages)
    && Number.isFinite(c.createdAt) && Number.isFinite(c.updatedAt) && c.settings && typeof c.settings === "object";
}

// The conversations of an exported file's text; throws an Error with a message for the user.
export function parseFile(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("This file is not JSON.");
  }
  if (data?.format !== FORMAT || !Array.isArray(data.conversations)) throw new Error("This file is not a Petals Chat export.");
  const invalid = data.conversations.filter((c) => !validConversation(c)).length;
  if (invalid) throw new Error(`${invalid} conversation(s) in this file are damaged; nothing was imported.`);
  return data.conversations;
}
