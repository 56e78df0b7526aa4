// Conversations kept in this browser: one IndexedDB object store, keyed by conversation id.

const DB_NAME = "petals-chat";
const STORE = "conversations";
let opened = null;

function database() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function run(mode, action) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const request = action(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = () => reject(transaction.error);
  });
}

// Every conversation, the most recently updated first.
export async function listConversations() {
  const all = await run("readonly", (store) => store.getAll());
  return all.sort((a, b) => b.updatedAt - a.updatedAt);
}

export function saveConversation(conversation) {
  return run("readwrite", (store) => store.put(conversation));
}

export function deleteConversation(id) {
  return run("readwrite", (store) => store.delete(id));
}
