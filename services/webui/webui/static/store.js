// Conversations and chat settings, kept in this browser's localStorage (they survive a reload
// and never leave the browser except as the messages of a request).
import { removeLeaf, upgrade } from "./branches.js";

const CONVERSATIONS = "nanochat.conversations.v1";
const SETTINGS = "nanochat.settings.v1";

// The original nanochat web chat's sampling defaults (its terminal chat uses temperature 0.6).
// The system prompt belongs to each chat (conversation.system), not to the settings.
export const DEFAULT_SETTINGS = { temperature: 0.8, top_k: 50, max_tokens: 512 };

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;  // a corrupt entry must not take the whole UI down
  }
}

// A reply still "streaming" in storage was cut off by a reload or a closed tab: its stream is
// gone, so it is kept as far as it got and marked interrupted (or dropped when it got nowhere).
function repairInterrupted(conv) {
  conv.messages = conv.messages.filter(Boolean);
  upgrade(conv);
  for (const m of [...conv.messages]) {
    if (m.state === "streaming" && !(m.parts || []).length) removeLeaf(conv, m);
    else if (m.state === "streaming") m.state = "interrupted";
  }
  return conv;
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter((c) => c && c.id && Array.isArray(c.messages)).map(repairInterrupted) : [];
}

export function saveConversations(list) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
}

export function newConversation() {
  const now = Date.now();
  return { id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 8)}`, title: "New chat", created: now, updated: now,
    messages: [], notes: [], leaf: null, system: "" };
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}
