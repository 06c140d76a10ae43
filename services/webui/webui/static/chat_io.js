// Chats in and out of the browser: every chat as JSON (the whole tree, importable again), the
// shown branch of one chat as Markdown.
import { newId, pathOf, upgrade } from "./branches.js";
import { MODEL_REF } from "./version_picker.js";

const FORMAT = "nanochat.chats.v1";

function textOf(message) {
  if (message.role === "user") return message.content;
  return (message.parts || []).map((p) => (p.type === "text" ? p.text : `\n\`\`\`${p.type}\n${p.text}\n\`\`\`\n`)).join("");
}

export function download(filename, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function chatsToJson(conversations) {
  return JSON.stringify({ format: FORMAT, exported: new Date().toISOString(), conversations }, null, 2);
}

export function chatToMarkdown(conv) {
  const out = [`# ${conv.title}`, ""];
  if (conv.system?.trim()) out.push(`> System: ${conv.system.trim()}`, "");
  for (const m of pathOf(conv)) {
    out.push(m.role === "user" ? "## User" : "## Assistant", "", textOf(m).trim(), "");
  }
  return out.join("\n");
}

function validMessage(m) {
  if (!m || typeof m !== "object") return false;
  if (m.role === "user") return typeof m.content === "string";
  if (m.role === "assistant") return Array.isArray(m.parts) && m.parts.every((p) => p && typeof p.text === "string");
  return m.role === "note" && typeof m.text === "string";
}

// Parses an exported file; throws an Error whose message says what is wrong with it. Chats whose
// id is already here come in under a new id, so an import never overwrites a chat.
export function chatsFromJson(text, existingIds) {
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error("The file is not JSON.");
  }
  const list = Array.isArray(body) ? body : body?.conversations;
  if (!Array.isArray(list)) throw new Error("The file holds no conversations (expected an export of this chat).");
  return list.map((conv, i) => {
    if (!conv || !Array.isArray(conv.messages) || !conv.messages.every(validMessage)) {
      throw new Error(`Conversation ${i + 1} in the file is malformed.`);
    }
    const copy = upgrade({ ...conv, title: String(conv.title || "Imported chat").slice(0, 80) });
    for (const m of copy.messages) if (m.state === "streaming") m.state = "interrupted";
    // A chat's model goes out as the request's `model`: only a well-formed one comes in.
    if (!(typeof copy.model === "string" && MODEL_REF.test(copy.model))) delete copy.model;
    if (!copy.id || existingIds.has(copy.id)) copy.id = `c${newId()}`;
    copy.updated = Date.now();
    return copy;
  });
}
