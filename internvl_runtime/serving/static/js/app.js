// The chat page: status, settings, attachments (images, pasted or dropped, and videos), the conversation and its
// streamed answers (/v1/chat/completions with stream: true), and the conversations kept in this browser.

import { readAsDataURL, videoPoster } from "./media.js";
import { addAssistantActions, assistantElement, lastImageBefore, setMeta, startEditing, textOf, updateAssistant,
         userElement } from "./messages.js";
import { ConversationStore, exportConversation, importConversation, MAX_BYTES } from "./store.js";

const $ = (id) => document.getElementById(id);
const newId = () => (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);
const freshConversation = () => ({ id: newId(), title: "", messages: [] });

const state = {
  model: null,              // the served model id (from /v1/models)
  conversation: freshConversation(),
  attachments: [],          // [{kind: "image", url} | {kind: "video", url, poster}] waiting for the next message
  controller: null,         // AbortController of the generation in flight
  store: null,              // ConversationStore, or null where IndexedDB is unavailable
};
const storeReady = ConversationStore.open().then((store) => { state.store = store; }).catch((error) => {
  $("store-note").textContent = "Conversations cannot be kept in this browser: " + error.message;
});

// -- settings, kept in localStorage ---------------------------------------------------------------------------
for (const id of ["api-key", "system", "max-tokens", "temperature", "max-tiles", "num-frames"]) {
  const value = localStorage.getItem("internvl:" + id);
  if (value !== null) $(id).value = value;
  $(id).addEventListener("change", () => localStorage.setItem("internvl:" + id, $(id).value));
}
$("settings-toggle").addEventListener("click", () => {
  const open = $("settings").classList.toggle("open");
  $("settings-toggle").setAttribute("aria-expanded", String(open));
});
$("sidebar-toggle").addEventListener("click", () => {
  const closed = $("sidebar").classList.toggle("closed");
  $("sidebar-toggle").setAttribute("aria-expanded", String(!closed));
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// -- server status ----------------------------------------------------------------------------------------------
function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = cls; }
async function poll() {
  try {
    const health = await (await fetch("/health", { cache: "no-store" })).json();
    $("demo-banner").style.display = health.demo ? "block" : "none";
    if (health.status !== "ok") {
      setStatus(health.status === "error" ? "model failed to load" : "loading model…",
                health.status === "error" ? "down" : "loading");
      setTimeout(poll, 1000);
      return;
    }
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      setStatus("API key needed (Settings)", "down");
      $("settings").classList.add("open");
      setTimeout(poll, 2000);
      return;
    }
    const models = await r.json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
    setStatus("ready", "ready");
  } catch (e) {
    setStatus("server unreachable", "down");
    setTimeout(poll, 2000);
  }
}
$("api-key").addEventListener("change", poll);

// -- attachments: file picker, paste, drag and drop --------------------------------------------------------------
async function addFiles(files) {
  for (const file of files) {
    if (file.type.startsWith("image/")) {
      state.attachments.push({ kind: "image", url: await readAsDataURL(file) });
    } else if (file.type.startsWith("video/")) {
      const [url, poster] = await Promise.all([readAsDataURL(file), videoPoster(file)]);
      state.attachments.push({ kind: "video", url, poster, name: file.name });
    }
  }
  renderAttachments();
}
function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((item, i) => {
    const div = document.createElement("div");
    div.className = "thumb " + item.kind;
    let preview;
    if (item.kind === "image" || item.poster) {
      preview = document.createElement("img");
      preview.src = item.kind === "image" ? item.url : item.poster;
      preview.alt = `${item.kind} ${i + 1}`;
    } else {
      preview = document.createElement("span");
      preview.className = "video-placeholder";
      preview.textContent = "🎞 " + (item.name || "video");
    }
    const x = document.createElement("button");
    x.type = "button"; x.textContent = "×"; x.title = "Remove";
    x.setAttribute("aria-label", `Remove attachment ${i + 1}`);
    x.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); });
    div.append(preview, x);
    box.append(div);
  });
}
$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", async (e) => { await addFiles([...e.target.files]); e.target.value = ""; });
$("input").addEventListener("paste", async (e) => {
  const files = [...(e.clipboardData?.items || [])].filter((it) => it.kind === "file").map((it) => it.getAsFile());
  if (files.length) { e.preventDefault(); await addFiles(files); }
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", async (e) => { e.preventDefault(); await addFiles([...e.dataTransfer.files]); });

// -- the conversation on screen -----------------------------------------------------------------------------------
function scrollDown() { const s = $("scroller"); s.scrollTop = s.scrollHeight; }

function showEmpty(text) {
  const empty = document.createElement("div");
  empty.id = "empty";
  empty.textContent = text;
  $("messages").replaceChildren(empty);
}

function renderConversation() {
  const messages = state.conversation.messages;
  if (!messages.length) {
    showEmpty("New conversation. Ask something; attach or paste images (or a video) to talk about them.");
    return;
  }
  const last = messages.length - 1;
  $("messages").replaceChildren(...messages.map((m, i) => (m.role === "assistant"
    ? assistantElement(m, i, { image: lastImageBefore(messages, i),
                               onRegenerate: i === last ? () => regenerate(i) : null })
    : userElement(m, i, { onEdit: m.role === "user" ? (div) => edit(div, i) : null }))));
  scrollDown();
}

function edit(div, index) {
  if (state.controller) return;
  const message = state.conversation.messages[index];
  startEditing(div, message, (text) => {
    const media = message.content.filter((p) => p.type !== "text");
    const edited = { role: "user", content: [{ type: "text", text: text.trim() }, ...media] };
    if (message.ui) edited.ui = message.ui;
    state.conversation.messages.splice(index, Infinity, edited);
    renderConversation();
    save(state.conversation);
    generate();
  }, renderConversation);
}

function regenerate(index) {
  if (state.controller || state.conversation.messages[index]?.role !== "assistant") return;
  state.conversation.messages.splice(index, Infinity);
  renderConversation();
  generate();
}

// -- keeping conversations ---------------------------------------------------------------------------------------
let pendingSaves = 0;
function countSave(delta) {          // body[data-pending-saves] says when every write has landed (tests wait on it)
  pendingSaves += delta;
  document.body.dataset.pendingSaves = String(pendingSaves);
}

async function save(conversation) {
  countSave(1);                      // before any await: counted from the moment the answer is kept
  try {
    await saveNow(conversation);
  } finally {
    countSave(-1);
  }
}

async function saveNow(conversation) {
  await storeReady;
  if (!state.store || !conversation.messages.length) return;
  if (!conversation.title) {
    const first = conversation.messages.find((m) => m.role === "user");
    conversation.title = (first && textOf(first).trim().slice(0, 60)) || "Conversation";
  }
  try {
    const result = await state.store.put(conversation);
    $("store-note").textContent = !result.saved
      ? `This conversation is over ${MAX_BYTES >> 20} MB and is not kept.`
      : result.evicted.length ? `Deleted to make room: ${result.evicted.join(", ")}` : "";
    if (conversation === state.conversation) localStorage.setItem("internvl:current", conversation.id);
  } catch (error) {
    $("store-note").textContent = "Could not keep this conversation: " + error.message;
  }
  await refreshList();
}

async function refreshList() {
  await storeReady;
  if (!state.store) return;
  const list = $("chats");
  const items = (await state.store.list()).map((meta) => {
    const li = document.createElement("li");
    li.className = "chat";
    li.dataset.id = meta.id;
    const active = meta.id === state.conversation.id;
    if (active) li.classList.add("active");
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = meta.title;
    open.setAttribute("aria-label", `Open conversation: ${meta.title}`);
    if (active) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => openConversation(meta.id));
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "rename"; rename.textContent = "✎";
    rename.setAttribute("aria-label", `Rename conversation: ${meta.title}`);
    rename.addEventListener("click", () => startRename(li, meta));
    const del = document.createElement("button");
    del.type = "button"; del.className = "delete"; del.textContent = "✕";
    del.setAttribute("aria-label", `Delete conversation: ${meta.title}`);
    del.addEventListener("click", () => deleteConversation(meta.id));
    li.append(open, rename, del);
    return li;
  });
  list.replaceChildren(...items);
}

function startRename(li, meta) {
  const input = document.createElement("input");
  input.value = meta.title;
  input.setAttribute("aria-label", "New name of the conversation");
  let done = false;
  const finish = async (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (keep && title) {
      await state.store.rename(meta.id, title);
      if (meta.id === state.conversation.id) state.conversation.title = title;
    }
    await refreshList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

async function openConversation(id) {
  if (state.controller) state.controller.abort();
  const conversation = await state.store.get(id);
  if (!conversation) return;
  state.conversation = conversation;
  localStorage.setItem("internvl:current", id);
  renderConversation();
  await refreshList();
}

async function deleteConversation(id) {
  await state.store.delete(id);
  if (id === state.conversation.id) newChat();
  await refreshList();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.conversation = freshConversation();
  localStorage.removeItem("internvl:current");
  state.attachments = [];
  renderAttachments();
  $("messages").replaceChildren();
  showEmpty("New conversation. Ask something; attach or paste images (or a video) to talk about them.");
  $("input").value = "";
  $("input").focus();
  refreshList();
}
$("new-chat").addEventListener("click", newChat);
$("delete-all").addEventListener("click", async () => {
  await storeReady;
  if (!state.store || !confirm("Delete all conversations kept in this browser?")) return;
  await state.store.clear();
  newChat();
});

$("export").addEventListener("click", () => {
  const conversation = state.conversation;
  if (!conversation.messages.length) { $("store-note").textContent = "Nothing to export yet."; return; }
  const blob = new Blob([JSON.stringify(exportConversation(conversation), null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = (conversation.title || "conversation").replace(/[^\w .-]+/g, "_").slice(0, 60) + ".json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
});
$("import").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    const imported = importConversation(JSON.parse(await file.text()), file.name.replace(/\.json$/i, ""));
    if (state.controller) state.controller.abort();
    state.conversation = { id: newId(), ...imported };
    renderConversation();
    await save(state.conversation);
    $("store-note").textContent = `Imported ${imported.messages.length} messages.`;
  } catch (error) {
    $("store-note").textContent = "Import failed: " + error.message;
  }
});

// -- sending and streaming ---------------------------------------------------------------------------------------
function requestMessages(messages) {
  const out = messages.map(({ role, content }) => ({ role, content }));
  const system = $("system").value.trim();
  if (system && !out.some((m) => m.role === "system")) out.unshift({ role: "system", content: system });
  return out;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  for (const b of document.querySelectorAll(".msg .actions button")) b.disabled = busy;
}

// Reads server-sent events from a fetch body: calls onEvent(payload) for each "data:" line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = $("input").value.trim();
  if (state.controller || (!text && !state.attachments.length)) return;
  if (!state.model) { $("hint").textContent = "The model is not ready yet."; return; }
  $("hint").textContent = "";
  const attachments = state.attachments.splice(0);
  const content = [{ type: "text", text }];
  for (const a of attachments.filter((x) => x.kind === "image")) content.push({ type: "image_url", image_url: { url: a.url } });
  const videos = attachments.filter((x) => x.kind === "video");
  for (const a of videos) content.push({ type: "video_url", video_url: { url: a.url } });
  const message = { role: "user", content };
  if (videos.length) message.ui = { posters: videos.map((v) => v.poster), frames: numFrames() };
  state.conversation.messages.push(message);
  $("input").value = "";
  renderAttachments();
  renderConversation();
  save(state.conversation);
  await generate();
}

function numFrames() { const n = Math.floor(Number($("num-frames").value)); return n >= 1 ? n : null; }

/** Answers the conversation as it stands (its last message is the user's), streaming into a new message. */
async function generate() {
  const conversation = state.conversation;
  const messages = conversation.messages;
  const index = messages.length;
  const image = lastImageBefore(messages, index);
  const body = {
    model: state.model, messages: requestMessages(messages), stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 512, temperature: Number($("temperature").value) || 0,
    // InternVL's grounding tags (<ref>, <box>, <quad>) are special tokens: kept in the text to be drawn
    skip_special_tokens: false,
  };
  const tiles = Number($("max-tiles").value);
  if (tiles) body.max_dynamic_patch = tiles;      // else the server's default
  if (body.messages.some((m) => Array.isArray(m.content) && m.content.some((p) => p.type === "video_url"))) {
    const frames = numFrames();
    if (frames) body.media_io_kwargs = { video: { num_frames: frames } };
  }
  $("empty")?.remove();
  document.querySelector(".msg.assistant .regenerate")?.remove();
  const div = assistantElement({ role: "assistant", content: "" }, index);
  div.classList.remove("done");
  div.classList.add("streaming");
  div.querySelector(".actions").remove();
  $("messages").append(div);
  scrollDown();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let usage = null, finish = null, answer = "", pending = null;
  const show = () => { pending = null; updateAssistant(div, answer); scrollDown(); };
  const keep = (status, meta) => {
    messages.push({ role: "assistant", content: answer, ui: { status, meta } });
    save(conversation);
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          if (!pending) pending = setTimeout(show, 40);      // re-render at most every 40 ms while streaming
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    const seconds = (performance.now() - started) / 1000;
    let meta = finish === "length" ? "stopped at max tokens" : "done";
    if (usage) meta += ` · ${usage.prompt_tokens} in, ${usage.completion_tokens} out · ` +
                       `${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`;
    setMeta(div, meta);
    keep("done", meta);
  } catch (error) {
    if (error.name === "AbortError") {
      setMeta(div, "stopped");
      div.classList.add("stopped");
      keep("stopped", "stopped");
    } else {
      // a failed turn is forgotten (its question too), so the next one is sent without it
      if (messages[index - 1]?.role === "user") messages.splice(index - 1, 1);
      if (!answer) div.classList.add("error");
      setMeta(div, "error: " + error.message);
      save(conversation);
    }
  } finally {
    clearTimeout(pending);
    updateAssistant(div, answer, { image, final: true });
    div.classList.remove("streaming");
    div.classList.add("done");
    if (!div.classList.contains("error") && messages[index]?.role === "assistant") {
      addAssistantActions(div, () => regenerate(index));
    }
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  if (e.key === "Escape" && state.controller) { e.preventDefault(); state.controller.abort(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

// -- start: the last conversation comes back ---------------------------------------------------------------------
setBusy(false);
poll();
(async () => {
  const initial = state.conversation;
  await storeReady;
  const current = localStorage.getItem("internvl:current");
  if (state.store && current) {
    const conversation = await state.store.get(current);
    // unless the user started something meanwhile
    if (conversation && state.conversation === initial && !initial.messages.length) {
      state.conversation = conversation;
      renderConversation();
    }
  }
  await refreshList();
  document.body.dataset.restored = "true";      // (tests wait on it)
})();
