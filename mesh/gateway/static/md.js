// A small, safe markdown renderer for chat answers.
//
// Safety comes first: the whole source is HTML-escaped before any markdown rule runs, so
// no rule can ever produce a tag the model wrote; the only tags in the output are the ones
// built here. Links are kept only for http(s) URLs. Handles what chat models write:
// fenced code (also unterminated, while streaming), inline code, bold/italic/strike,
// headings, lists (nested, ordered, tight), block quotes, rules, simple pipe tables,
// paragraphs with line breaks.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}&gt; ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function indentOf(line) {
  return line.length - line.replace(/^ +/, "").length;
}

function isBlank(line) {
  return line.trim() === "";
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

// ---------------------------------------------------------------- inline

function inline(text) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let out = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
    const body = code.length > 2 && code.startsWith(" ") && code.endsWith(" ") ? code.slice(1, -1) : code;
    return hold(`<code>${body}</code>`);
  });
  out = out.replace(/!?\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, label, url) => hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`));
  out = emphasis(out);
  return out.replace(/\u0000(\d+)\u0000/g, (_, i) => held[Number(i)]);
}

function emphasis(text) {
  return text
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}

// ---------------------------------------------------------------- blocks

function codeBlock(lang, body) {
  const safeLang = lang.replace(/[^\w+#.-]/g, "").slice(0, 24);
  const label = safeLang || "code";
  const cls = safeLang ? ` class="language-${safeLang}"` : "";
  return `<div class="code-block"><div class="code-head"><span>${label}</span>` +
    `<button type="button" class="copy-code" data-copy-code>Copy</button></div>` +
    `<pre><code${cls}>${body}</code></pre></div>`;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|")) row = row.slice(0, -1);
  return row.split("|").map((cell) => cell.trim());
}

function table(lines) {
  const head = splitRow(lines[0]);
  const aligns = splitRow(lines[1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "");
  const cell = (tag, text, i) =>
    `<${tag}${aligns[i] ? ` style="text-align:${aligns[i]}"` : ""}>${inline(text)}</${tag}>`;
  const body = lines.slice(2).map((l) => `<tr>${splitRow(l).map((c, i) => cell("td", c, i)).join("")}</tr>`);
  return `<div class="table-wrap"><table><thead><tr>${head.map((c, i) => cell("th", c, i)).join("")}</tr></thead>` +
    `<tbody>${body.join("")}</tbody></table></div>`;
}

function list(lines, start) {
  const first = ITEM.exec(lines[start]);
  const base = first[1].length;
  const ordered = /\d/.test(first[2]);
  const items = [];
  let loose = false;
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== base || /\d/.test(m[2]) !== ordered) break;
    const content = [m[3]];
    const contentIndent = base + m[2].length + 1;
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        let j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j += 1;
        if (j >= lines.length) { i = j; break; }
        const next = ITEM.exec(lines[j]);
        if (indentOf(lines[j]) > base && !(next && next[1].length <= base)) {
          content.push("");
          loose = true;
          i = j;
          continue;
        }
        if (next && next[1].length === base && /\d/.test(next[2]) === ordered) loose = true;
        i = j;
        break;
      }
      const item = ITEM.exec(line);
      if (item && item[1].length <= base) break;
      if (!item && indentOf(line) <= base && startsBlock(line)) break;
      content.push(line.slice(Math.min(indentOf(line), contentIndent)));
      i += 1;
    }
    items.push(content);
  }
  const startNumber = ordered ? parseInt(first[2], 10) : 1;
  const tag = ordered ? "ol" : "ul";
  const attr = ordered && startNumber !== 1 ? ` start="${startNumber}"` : "";
  const html = items.map((content) => `<li>${blocks(content, !loose)}</li>`).join("");
  return { html: `<${tag}${attr}>${html}</${tag}>`, next: i };
}

function blocks(lines, tight = false) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) { i += 1; continue; }

    const fence = FENCE.exec(line);
    if (fence) {
      const marker = fence[1];
      const indent = indentOf(line);
      const body = [];
      i += 1;
      while (i < lines.length) {
        const close = lines[i].trim();
        if (close.startsWith(marker[0].repeat(marker.length)) && /^(`+|~+)$/.test(close) && close[0] === marker[0]) {
          i += 1;
          break;
        }
        body.push(lines[i].slice(Math.min(indentOf(lines[i]), indent)));
        i += 1;
      }
      out.push(codeBlock(fence[2], body.join("\n")));
      continue;
    }

    const heading = HEADING.exec(line);
    if (heading) {
      const level = heading[1].length;
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      i += 1;
      continue;
    }

    if (RULE.test(line)) { out.push("<hr>"); i += 1; continue; }

    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (QUOTE.test(lines[i]) || (!isBlank(lines[i]) && !startsBlock(lines[i])))) {
        quoted.push(lines[i].replace(QUOTE, ""));
        i += 1;
      }
      out.push(`<blockquote>${blocks(quoted)}</blockquote>`);
      continue;
    }

    if (ITEM.test(line)) {
      const { html, next } = list(lines, i);
      out.push(html);
      i = next;
      continue;
    }

    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) { rows.push(lines[i]); i += 1; }
      out.push(table(rows));
      continue;
    }

    const para = [];
    while (i < lines.length && !isBlank(lines[i]) && !(para.length && startsBlock(lines[i]))) {
      para.push(lines[i].trim());
      i += 1;
    }
    const html = para.map(inline).join("<br>");
    out.push(tight ? html : `<p>${html}</p>`);
  }
  return out.join(tight ? "\n" : "");
}

/** Markdown source (untrusted) -> HTML string that is safe to assign to innerHTML. */
export function renderMarkdown(source) {
  const text = escapeHtml(String(source ?? "").replace(/\u0000/g, "").replace(/\r\n?/g, "\n"));
  return blocks(text.split("\n"));
}
