// One message of the conversation -> its DOM. Messages are OpenAI chat messages ({role, content}) with an optional
// page-only "ui" field: a user message's video posters, an assistant message's status line and state.

import { groundingFigure, parseGrounding } from "./grounding.js";
import { renderMarkdown } from "./markdown.js";

/** Only media the page holds itself are shown (data: and blob: URLs); a URL from an imported file is named. */
function displayable(url) { return /^(data|blob):/i.test(url); }

function button(text, label, onClick, cls = "small") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

export function textOf(message) {
  if (typeof message.content === "string") return message.content;
  return message.content.filter((p) => p.type === "text").map((p) => p.text).join("\n");
}

function parts(message, type) {
  return typeof message.content === "string" ? [] : message.content.filter((p) => p.type === type);
}

/** The image an answer at ``index`` refers to: the last image of the conversation before it, or null. */
export function lastImageBefore(messages, index) {
  for (let i = index - 1; i >= 0; i--) {
    const images = parts(messages[i], "image_url");
    if (images.length) return images[images.length - 1].image_url.url;
  }
  return null;
}

/** A user or system message. ``onEdit`` (optional) is called when its Edit button is pressed. */
export function userElement(message, index, { onEdit } = {}) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  div.dataset.index = String(index);
  const images = parts(message, "image_url");
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    images.forEach((part, i) => {
      if (displayable(part.image_url.url)) {
        const img = document.createElement("img");
        img.src = part.image_url.url;
        img.alt = `image ${i + 1}`;
        row.append(img);
      } else {
        const span = document.createElement("span");
        span.className = "video-placeholder";
        span.textContent = "image: " + part.image_url.url.slice(0, 60);
        row.append(span);
      }
    });
    div.append(row);
  }
  const videos = parts(message, "video_url");
  if (videos.length) {
    const row = document.createElement("div");
    row.className = "videos";
    const posters = (message.ui && message.ui.posters) || [];
    videos.forEach((part, i) => {
      const figure = document.createElement("figure");
      figure.className = "video";
      if (posters[i]) {
        const img = document.createElement("img");
        img.className = "poster";
        img.src = posters[i];
        img.alt = `video ${i + 1} (first frames)`;
        figure.append(img);
      } else {
        const span = document.createElement("span");
        span.className = "video-placeholder";
        span.textContent = "🎞 video";
        figure.append(span);
      }
      const caption = document.createElement("figcaption");
      caption.textContent = `video ${i + 1}` + (message.ui && message.ui.frames ? ` · ${message.ui.frames} frames` : "");
      figure.append(caption);
      row.append(figure);
    });
    div.append(row);
  }
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = textOf(message);
  div.append(text);
  if (onEdit) {
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(button("Edit", "Edit this message and answer again", () => onEdit(div)));
    div.append(actions);
  }
  return div;
}

/** An inline editor over a user message's text: Save (or Ctrl+Enter) calls onSave(newText), Cancel (or Escape)
 * puts the message back. */
export function startEditing(div, message, onSave, onCancel) {
  if (div.querySelector(".edit")) return;
  const box = document.createElement("div");
  box.className = "edit";
  const area = document.createElement("textarea");
  area.value = textOf(message);
  area.setAttribute("aria-label", "Edited message");
  const save = button("Save and answer again", "Save the edited message and answer again", () => onSave(area.value));
  const cancel = button("Cancel", "Cancel editing", onCancel);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); onSave(area.value); }
    if (e.key === "Escape") { e.preventDefault(); onCancel(); }
  });
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(save, cancel);
  box.append(area, actions);
  div.querySelector(":scope > .text").replaceWith(box);
  div.querySelector(".actions:not(.edit .actions)")?.remove();
  area.focus();
}

/** An assistant message: rendered markdown, the raw text (hidden until toggled), the grounding figure over
 * ``image`` when the answer has boxes, the status line, and its buttons. */
export function assistantElement(message, index, { image = null, onRegenerate = null } = {}) {
  const div = document.createElement("div");
  div.className = "msg assistant";
  div.dataset.index = String(index);
  const text = document.createElement("div");
  text.className = "text";
  const raw = document.createElement("pre");
  raw.className = "raw";
  raw.hidden = true;
  div.append(text, raw);
  updateAssistant(div, message.content, { image, final: true });
  const ui = message.ui || {};
  if (ui.status) div.classList.add(ui.status);
  div.classList.add("done");
  if (ui.meta) setMeta(div, ui.meta);
  addAssistantActions(div, onRegenerate);
  return div;
}

/** Re-renders an assistant message's text (while it streams and once done); the grounding figure once final. */
export function updateAssistant(div, content, { image = null, final = false } = {}) {
  div.querySelector(":scope > .text").replaceChildren(renderMarkdown(content));
  div.querySelector(".raw").textContent = content;
  if (!final) return;
  div.querySelector(".grounding")?.remove();
  const groups = parseGrounding(content);
  if (groups.length && image && displayable(image)) div.querySelector(".raw").after(groundingFigure(image, groups));
}

export function addAssistantActions(div, onRegenerate) {
  div.querySelector(".actions")?.remove();
  const actions = document.createElement("div");
  actions.className = "actions";
  const toggle = button("Raw text", "Show the raw text of this answer", () => {
    const showRaw = toggle.getAttribute("aria-pressed") !== "true";
    toggle.setAttribute("aria-pressed", String(showRaw));
    div.querySelector(".raw").hidden = !showRaw;
    div.querySelector(":scope > .text").hidden = showRaw;
  });
  toggle.classList.add("raw-toggle");
  toggle.setAttribute("aria-pressed", "false");
  actions.append(toggle);
  if (onRegenerate) {
    const again = button("Regenerate", "Answer this again", onRegenerate);
    again.classList.add("regenerate");
    actions.append(again);
  }
  div.append(actions);
}

export function setMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    const actions = div.querySelector(".actions");
    if (actions) actions.before(meta); else div.append(meta);
  }
  meta.textContent = text;
}
