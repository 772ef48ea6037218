// InternVL grounding in answers: <ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box> (several boxes per ref) and
// <quad>[[x1, y1, x2, y2, x3, y3, x4, y4], ...]</quad>, coordinates in 0-1000 of the image's width and height
// (the official models' convention). Parsed here, in the page, and drawn over the image the answer refers to:
// the last image of the conversation before it. One colour per ref (c0..c7 in style.css).

export const NUM_COLOURS = 8;
const TAG = /<ref>([\s\S]*?)<\/ref>|<(box|quad)>([\s\S]*?)<\/(?:box|quad)>/g;

/** The shapes inside one <box> or <quad>: lists of numbers, clamped to 0..1000. A box holds 4 numbers, a quad 8
 * (a quad of 4 is a box). Unbracketed numbers are read in runs of 4 or 8. */
export function parseShapes(kind, body) {
  const size = kind === "quad" ? 8 : 4;
  const groups = [...body.matchAll(/\[([^[\]]*)\]/g)].map((m) => m[1]);
  const lists = groups.length ? groups.map(numbers) : chunk(numbers(body), size);
  const boxes = [], quads = [];
  for (const list of lists) {
    const values = list.map((v) => Math.min(1000, Math.max(0, v)));
    if (values.length === 4) boxes.push(values);
    else if (values.length === 8 && kind === "quad") quads.push(values);
  }
  return { boxes, quads };
}

function numbers(text) { return [...text.matchAll(/-?\d+(?:\.\d+)?/g)].map((m) => Number(m[0])); }
function chunk(list, size) {
  const out = [];
  for (let i = 0; i + size <= list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

/** Text -> [{ref, boxes: [[x1, y1, x2, y2]], quads: [[x1, y1, ..., x4, y4]]}] in order of appearance. A box or
 * quad belongs to the <ref> right before it (only white space between); one without a ref has ref null. Refs
 * without any shape are left out. */
export function parseGrounding(text) {
  const groups = [];
  let current = null, lastEnd = -1;
  for (const match of text.matchAll(TAG)) {
    if (match[1] !== undefined) {
      current = { ref: match[1].trim(), boxes: [], quads: [] };
      groups.push(current);
    } else {
      const attached = current && text.slice(lastEnd, match.index).trim() === "";
      if (!attached) { current = { ref: null, boxes: [], quads: [] }; groups.push(current); }
      const shapes = parseShapes(match[2], match[3]);
      current.boxes.push(...shapes.boxes);
      current.quads.push(...shapes.quads);
    }
    lastEnd = match.index + match[0].length;
  }
  return groups.filter((g) => g.boxes.length || g.quads.length);
}

// -- in the rendered text: a ref becomes a coloured phrase, its box tags disappear --------------------------------

let counter = 0;    // the colour of the next ref with shapes, reset for every answer rendered (preprocess hook)

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                    "'": "&#39;" })[c]);
}

/** A marked extension (inline): <ref>..</ref> with its following <box>/<quad> tags, or tags on their own. */
export const groundingExtension = {
  name: "grounding",
  level: "inline",
  start: (src) => src.match(/<(?:ref|box|quad)>/)?.index,
  tokenizer(src) {
    const match = /^(?:<ref>([\s\S]*?)<\/ref>)?((?:\s*<(?:box|quad)>[\s\S]*?<\/(?:box|quad)>)*)/.exec(src);
    if (!match || !match[0] || (match[1] === undefined && !match[2])) return undefined;
    const hasShapes = parseGrounding("<ref></ref>" + match[2]).length > 0;
    return { type: "grounding", raw: match[0], ref: match[1], hasShapes };
  },
  renderer(token) {
    const colour = token.hasShapes ? counter++ % NUM_COLOURS : null;
    const label = token.ref !== undefined ? token.ref : (token.hasShapes ? "▭" : "");
    const cls = colour === null ? "ref" : `ref c${colour}`;
    return `<mark class="${cls}">${escapeHtml(label)}</mark>`;
  },
};

export function resetColours() { counter = 0; }

// -- over the image ---------------------------------------------------------------------------------------------

/** A figure: the image with one absolutely placed box (div.gbox) per box, and quads as SVG polygons, in percent of
 * the image so they follow its displayed size. data-box keeps the 0-1000 coordinates, data-ref the phrase. */
export function groundingFigure(imageUrl, groups) {
  const figure = document.createElement("figure");
  figure.className = "grounding";
  figure.setAttribute("aria-label", "Regions the answer refers to");
  const frame = document.createElement("div");
  frame.className = "gframe";
  const img = document.createElement("img");
  img.src = imageUrl;
  img.alt = "image with the regions: " + groups.map((g) => g.ref || "region").join(", ");
  frame.append(img);
  let svg = null;
  groups.forEach((group, i) => {
    const colour = `c${i % NUM_COLOURS}`;
    const label = group.ref || "region";
    for (const [x1, y1, x2, y2] of group.boxes) {
      const box = document.createElement("div");
      box.className = `gbox ${colour}`;
      box.dataset.ref = label;
      box.dataset.box = [x1, y1, x2, y2].join(",");
      box.style.left = `${Math.min(x1, x2) / 10}%`;
      box.style.top = `${Math.min(y1, y2) / 10}%`;
      box.style.width = `${Math.abs(x2 - x1) / 10}%`;
      box.style.height = `${Math.abs(y2 - y1) / 10}%`;
      const tag = document.createElement("span");
      tag.className = "glabel";
      const text = document.createElement("span");
      text.textContent = label;
      tag.append(text);
      box.append(tag);
      frame.append(box);
    }
    for (const quad of group.quads) {
      if (!svg) {
        svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
        svg.setAttribute("class", "gquads");
        svg.setAttribute("viewBox", "0 0 1000 1000");
        svg.setAttribute("preserveAspectRatio", "none");
        frame.append(svg);
      }
      const polygon = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
      polygon.setAttribute("class", colour);
      polygon.setAttribute("points", chunk(quad, 2).map((p) => p.join(",")).join(" "));
      polygon.dataset.ref = label;
      svg.append(polygon);
    }
  });
  figure.append(frame);
  return figure;
}
