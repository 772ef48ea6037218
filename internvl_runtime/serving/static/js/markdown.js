// Model answers -> safe DOM: markdown (marked), math (KaTeX), code highlighting (highlight.js), then DOMPurify.
//
// Model output is text from a machine anyone can prompt, so it is never run as HTML or script:
// - raw HTML in the answer is shown as text (the html renderer escapes it), and DOMPurify then removes anything
//   active that the renderers produced anyway (scripts, event handlers, forms, frames, styles);
// - markdown images are NOT loaded (a tracking pixel would tell a third party the answer was read): they become
//   a placeholder naming the image, and DOMPurify forbids every element that loads media;
// - links keep only http(s), mailto and in-page targets (javascript: and data: are removed), open in a new tab,
//   and carry rel="noopener noreferrer";
// - style attributes (KaTeX needs them) lose any url(...), so CSS cannot fetch either.
// The page's Content-Security-Policy is the second wall: no inline script, no load from elsewhere.
//
// The vendored libraries are classic scripts (static/vendor/) that set window.marked, DOMPurify, katex, hljs.

import { groundingExtension, resetColours } from "./grounding.js";

const { marked, DOMPurify, katex, hljs } = window;

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                    "'": "&#39;" })[c]);
}

// -- math: $$...$$ and \[...\] blocks, $...$ and \(...\) inline -----------------------------------------------

function renderMath(tex, displayMode) {
  // trust: false (the default) refuses \href, \url and \includegraphics; errors render in red, never throw.
  return katex.renderToString(tex, { displayMode, throwOnError: false, trust: false, strict: "ignore",
                                     output: "htmlAndMathml", maxSize: 50, maxExpand: 500 });
}

const mathBlock = {
  name: "mathBlock",
  level: "block",
  start: (src) => src.match(/\$\$|\\\[/)?.index,
  tokenizer(src) {
    const match = /^\$\$([\s\S]+?)\$\$[^\S\n]*(?:\n|$)/.exec(src) || /^\\\[([\s\S]+?)\\\][^\S\n]*(?:\n|$)/.exec(src);
    if (match) return { type: "mathBlock", raw: match[0], text: match[1].trim() };
    return undefined;
  },
  renderer: (token) => `<div class="math-block">${renderMath(token.text, true)}</div>\n`,
};

const mathInline = {
  name: "mathInline",
  level: "inline",
  start: (src) => src.match(/\$|\\\(/)?.index,
  tokenizer(src) {
    // $$x$$ inline, $x$ (no space inside the dollars, no digit right after: "$5 and $6" stays text), \(x\)
    const match = /^\$\$(?!\s)([^$]+?)\$\$/.exec(src) || /^\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/.exec(src)
      || /^\\\(([\s\S]+?)\\\)/.exec(src);
    if (match) return { type: "mathInline", raw: match[0], text: match[1], display: match[0].startsWith("$$") };
    return undefined;
  },
  renderer: (token) => renderMath(token.text, token.display),
};

// -- code, raw html, images ------------------------------------------------------------------------------------

const renderer = {
  code({ text, lang }) {
    const language = (lang || "").trim().split(/\s+/)[0];
    let body;
    if (language && hljs.getLanguage(language)) {
      body = hljs.highlight(text, { language, ignoreIllegals: true }).value;
    } else {
      body = escapeHtml(text);
    }
    return `<div class="code"><div class="code-head"><span class="lang">${escapeHtml(language || "text")}</span>` +
           `</div><pre><code class="hljs${language ? " language-" + escapeHtml(language) : ""}">${body}</code>` +
           "</pre></div>\n";
  },
  html({ text }) {
    return escapeHtml(text);                       // raw HTML from the model is shown, never parsed
  },
  image({ href, text }) {
    const label = text ? `image: ${text}` : "image";
    return `<span class="img-placeholder" title="images in answers are not loaded">[${escapeHtml(label)}` +
           `${href ? " (" + escapeHtml(href) + ")" : ""}]</span>`;
  },
};

const parser = new marked.Marked({ gfm: true, breaks: true, async: false });
parser.use({ extensions: [mathBlock, mathInline, groundingExtension], renderer });

// -- the sanitizer -----------------------------------------------------------------------------------------

const PURIFY = {
  USE_PROFILES: { html: true, svg: true, mathMl: true },
  FORBID_TAGS: ["style", "script", "img", "image", "picture", "source", "video", "audio", "track", "iframe",
                "frame", "object", "embed", "applet", "form", "input", "button", "textarea", "select", "option",
                "link", "meta", "base", "use", "foreignObject", "feImage", "animate", "set", "template"],
  FORBID_ATTR: ["srcset", "src", "poster", "background", "action", "formaction", "ping", "xlink:href", "dynsrc",
                "lowsrc"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  ALLOW_DATA_ATTR: true,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "style" && /url\s*\(|expression\s*\(|image-set|\\/i.test(data.attrValue)) {
    data.keepAttr = false;
  }
});
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  }
});

/** Markdown text -> a sanitized DocumentFragment (with a copy button on every code block). */
export function renderMarkdown(text) {
  resetColours();
  const html = parser.parse(text);
  const fragment = DOMPurify.sanitize(html, PURIFY);
  for (const block of fragment.querySelectorAll(".code")) addCopyButton(block);
  return fragment;
}

function addCopyButton(block) {
  const head = block.querySelector(".code-head");
  const code = block.querySelector("code");
  if (!head || !code) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code.textContent);
      button.textContent = "Copied";
    } catch (error) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  head.append(button);
}
