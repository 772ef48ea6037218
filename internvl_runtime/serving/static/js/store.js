// Conversations kept in this browser (IndexedDB), images and videos included.
//
// Two object stores: "meta" ({id, title, updated, bytes}: what the side list reads, small) and "conversations"
// ({id, messages}: the OpenAI messages with their media as data: URLs, plus page-only "ui" fields). Everything the
// page keeps together is capped (MAX_BYTES): saving past the cap deletes the oldest other conversations first,
// and a conversation larger than the cap on its own is not saved (the caller is told).

const DB_NAME = "internvl-chat";
const DB_VERSION = 1;
export const MAX_BYTES = 200 * 1024 * 1024;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
  });
}

export class ConversationStore {
  constructor(db, maxBytes) { this.db = db; this.maxBytes = maxBytes; }

  /** The page's store; ``name`` and ``maxBytes`` are there for tests (a scratch database, a small cap). */
  static async open({ name = DB_NAME, maxBytes = MAX_BYTES } = {}) {
    const req = indexedDB.open(name, DB_VERSION);
    req.onupgradeneeded = () => {
      const db = req.result;
      if (!db.objectStoreNames.contains("meta")) db.createObjectStore("meta", { keyPath: "id" });
      if (!db.objectStoreNames.contains("conversations")) db.createObjectStore("conversations", { keyPath: "id" });
    };
    return new ConversationStore(await request(req), maxBytes);
  }

  /** [{id, title, updated, bytes}], the most recently updated first. */
  async list() {
    const tx = this.db.transaction("meta", "readonly");
    const all = await request(tx.objectStore("meta").getAll());
    return all.sort((a, b) => b.updated - a.updated);
  }

  /** {id, title, messages} or null. */
  async get(id) {
    const tx = this.db.transaction(["meta", "conversations"], "readonly");
    const [meta, body] = await Promise.all([request(tx.objectStore("meta").get(id)),
                                            request(tx.objectStore("conversations").get(id))]);
    return meta && body ? { id, title: meta.title, messages: body.messages } : null;
  }

  /** Saves {id, title, messages}. Returns {saved, evicted: [titles of the conversations deleted to make room]}. */
  async put(conversation) {
    const bytes = new Blob([JSON.stringify(conversation.messages)]).size;
    if (bytes > this.maxBytes) return { saved: false, evicted: [] };
    const others = (await this.list()).filter((m) => m.id !== conversation.id);
    let total = bytes + others.reduce((sum, m) => sum + (m.bytes || 0), 0);
    const evicted = [];
    while (total > this.maxBytes && others.length) {
      const oldest = others.pop();
      total -= oldest.bytes || 0;
      evicted.push(oldest);
    }
    const tx = this.db.transaction(["meta", "conversations"], "readwrite");
    for (const old of evicted) {
      tx.objectStore("meta").delete(old.id);
      tx.objectStore("conversations").delete(old.id);
    }
    tx.objectStore("meta").put({ id: conversation.id, title: conversation.title, updated: Date.now(), bytes });
    tx.objectStore("conversations").put({ id: conversation.id, messages: conversation.messages });
    await done(tx);
    return { saved: true, evicted: evicted.map((m) => m.title) };
  }

  async rename(id, title) {
    const tx = this.db.transaction("meta", "readwrite");
    const meta = await request(tx.objectStore("meta").get(id));
    if (meta) tx.objectStore("meta").put({ ...meta, title });
    await done(tx);
  }

  async delete(id) {
    const tx = this.db.transaction(["meta", "conversations"], "readwrite");
    tx.objectStore("meta").delete(id);
    tx.objectStore("conversations").delete(id);
    await done(tx);
  }

  async clear() {
    const tx = this.db.transaction(["meta", "conversations"], "readwrite");
    tx.objectStore("meta").clear();
    tx.objectStore("conversations").clear();
    await done(tx);
  }

  /** Bytes kept, all conversations together. */
  async bytes() { return (await this.list()).reduce((sum, m) => sum + (m.bytes || 0), 0); }
}

// -- export and import: the OpenAI messages format ------------------------------------------------------------

/** The conversation as OpenAI chat messages (page-only fields dropped), in {"messages": [...]} with its title. */
export function exportConversation(conversation) {
  const messages = conversation.messages.map(({ role, content }) => ({ role, content }));
  return { title: conversation.title, messages };
}

const PART_TYPES = new Set(["text", "image_url", "video_url"]);

/** {"messages": [...]} or a bare array -> {title, messages}; throws Error with a reason on anything else. Keeps
 * system, user and assistant messages with string content or text / image_url / video_url parts. */
export function importConversation(data, fallbackTitle) {
  const messages = Array.isArray(data) ? data : data && data.messages;
  if (!Array.isArray(messages) || !messages.length) throw new Error("no \"messages\" list in the file");
  const out = messages.map((m, i) => {
    if (!m || !["system", "user", "assistant"].includes(m.role)) {
      throw new Error(`message ${i}: role must be system, user or assistant`);
    }
    if (typeof m.content === "string") return { role: m.role, content: m.content };
    if (!Array.isArray(m.content)) throw new Error(`message ${i}: content must be a string or a list of parts`);
    for (const part of m.content) {
      if (!part || !PART_TYPES.has(part.type)) throw new Error(`message ${i}: unknown part ${part && part.type}`);
      const url = part.type === "text" ? null : part[part.type] && part[part.type].url;
      if (part.type === "text" ? typeof part.text !== "string" : typeof url !== "string") {
        throw new Error(`message ${i}: a ${part.type} part without its ${part.type === "text" ? "text" : "url"}`);
      }
    }
    return { role: m.role, content: m.content };
  });
  const title = (!Array.isArray(data) && typeof data.title === "string" && data.title) || fallbackTitle;
  return { title, messages: out };
}
