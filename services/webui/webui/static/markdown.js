// A small markdown renderer that builds DOM nodes directly. It never parses HTML: raw tags in
// model output (<script>, <img onerror=...>) come out as visible text, so they stay inert.
// Covers what chat answers use: fenced code (with a copy button), headings, lists, quotes,
// rules, tables, paragraphs, `code`, **bold**, *italic* and [links](https://...); fenced code
// with a known language is highlighted by the vendored highlight.js. An image `![alt](src)` is
// whatever the caller's `image(src, alt)` makes of it (a report card's attached plot), else text.
import { h } from "./dom.js";
import hljs from "./vendor/highlight.min.js";

const SAFE_URL = /^(https?:|mailto:)/i;
const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => h("code", {}, m[1]) },
  { re: /\*\*([^*\n]+)\*\*/, make: (m, opts) => h("strong", {}, ...inline(m[1], opts)) },
  { re: /\*([^*\s][^*\n]*)\*/, make: (m, opts) => h("em", {}, ...inline(m[1], opts)) },
  { re: /(?<![\w])_([^_\s][^_\n]*)_(?![\w])/, make: (m, opts) => h("em", {}, ...inline(m[1], opts)) },
  { re: /!\[([^\]\n]*)\]\(([^)\s]+)\)/, make: (m, opts) => opts.image?.(m[2], m[1]) ?? document.createTextNode(m[0]) },
  {
    re: /\[([^\]\n]+)\]\(([^)\s]+)\)/,
    make: (m, opts) => SAFE_URL.test(m[2])
      ? h("a", { href: m[2], target: "_blank", rel: "noopener noreferrer nofollow" }, ...inline(m[1], opts))
      : document.createTextNode(m[0]),
  },
];

function inline(text, opts) {
  const nodes = [];
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { m, rule };
    }
    if (!best) { nodes.push(document.createTextNode(rest)); break; }
    if (best.m.index > 0) nodes.push(document.createTextNode(rest.slice(0, best.m.index)));
    nodes.push(best.rule.make(best.m, opts));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  return nodes;
}

function withBreaks(lines, opts) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i > 0) nodes.push(h("br"));
    nodes.push(...inline(line, opts));
  });
  return nodes;
}

// A button that copies what `text()` returns, and says whether that worked.
export function copyButton(text, label = "Copy code", testid = null, cls = "copy") {
  const copy = h("button", { class: cls, type: "button", "aria-label": label, "data-testid": testid }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text());
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  return copy;
}

// highlight.js escapes the code it is given and adds only its own <span class="hljs-…">, so its
// output is the one HTML this renderer sets. Code without a known language stays plain text
// (guessing it each repaint of a streamed answer would cost too much).
function highlighted(code, language) {
  const el = h("code", {});
  if (language && hljs.getLanguage(language)) {
    el.innerHTML = hljs.highlight(code, { language, ignoreIllegals: true }).value;
    el.className = `hljs language-${language}`;
  } else {
    el.textContent = code;
  }
  return el;
}

export function codeBlock(code, language = "") {
  return h("div", { class: "codeblock" },
    h("div", { class: "codebar" }, h("span", {}, language || "code"), copyButton(() => code)),
    h("pre", {}, highlighted(code, language)));
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

// The cells of a `| a | b |` row.
function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

export function renderMarkdown(source, opts = {}) {
  const out = document.createDocumentFragment();
  const lines = source.replace(/\r\n/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^\s*(```|~~~)\s*([\w+.-]*)\s*$/.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      // An unclosed fence (mid-stream) runs to the end, so code shows as code while it arrives.
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      out.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) { i += 1; continue; }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      out.append(h(`h${Math.min(heading[1].length + 2, 6)}`, {}, ...inline(heading[2], opts)));
      i += 1;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { out.append(h("hr")); i += 1; continue; }
    if (/^\s*>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      out.append(h("blockquote", {}, renderMarkdown(quoted.join("\n"), opts)));
      continue;
    }
    if (/^\s*\|.*\|\s*$/.test(line) && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const head = cells(line);
      i += 2;
      const rows = [];
      while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) rows.push(cells(lines[i++]));
      out.append(h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ...head.map((c) => h("th", {}, ...inline(c, opts))))),
        h("tbody", {}, ...rows.map((r) => h("tr", {}, ...head.map((_, k) => h("td", {}, ...inline(r[k] ?? "", opts)))))))));
      continue;
    }
    const item = LIST_ITEM.exec(line);
    if (item) {
      const ordered = /\d/.test(item[1]);
      const list = h(ordered ? "ol" : "ul");
      if (ordered && Number.parseInt(item[1], 10) !== 1) list.setAttribute("start", Number.parseInt(item[1], 10));
      while (i < lines.length) {
        const m = LIST_ITEM.exec(lines[i]);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const itemLines = [m[2]];
        i += 1;
        // Indented lines that follow belong to the same item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !LIST_ITEM.exec(lines[i])) itemLines.push(lines[i++].trim());
        list.append(h("li", {}, ...withBreaks(itemLines, opts)));
      }
      out.append(list);
      continue;
    }
    // The first line always belongs to the paragraph, so every pass moves on.
    const para = [lines[i++]];
    while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>)/.test(lines[i]) && !LIST_ITEM.exec(lines[i])) {
      para.push(lines[i++]);
    }
    out.append(h("p", {}, ...withBreaks(para, opts)));
  }
  return out;
}
