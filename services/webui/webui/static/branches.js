// A conversation is a tree: every message names its parent, and `leaf` is the message shown last.
// What is shown (and sent to the model) is the path from the root to the leaf. Editing a message
// or regenerating an answer adds a sibling, so the old branch stays one click away.
let counter = 0;

export function newId() {
  counter += 1;
  return `m${Date.now().toString(36)}${counter.toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

// Conversations saved before branching were a flat list with the model-change notes inline.
export function upgrade(conv) {
  if (typeof conv.leaf === "string" || conv.leaf === null) {
    conv.notes = Array.isArray(conv.notes) ? conv.notes : [];
    if (conv.leaf !== null && !conv.messages.some((m) => m.id === conv.leaf)) conv.leaf = conv.messages.at(-1)?.id ?? null;
    return conv;
  }
  const messages = [];
  const notes = [];
  let parent = null;
  for (const m of conv.messages) {
    if (m.role === "note") { notes.push({ after: parent, text: m.text }); continue; }
    m.id = m.id ?? newId();
    m.parent = parent;
    parent = m.id;
    messages.push(m);
  }
  return Object.assign(conv, { messages, notes, leaf: parent, system: conv.system ?? "" });
}

export function pathOf(conv) {
  const byId = new Map(conv.messages.map((m) => [m.id, m]));
  const out = [];
  for (let m = byId.get(conv.leaf); m; m = byId.get(m.parent)) out.push(m);
  return out.reverse();
}

export function siblingsOf(conv, message) {
  return conv.messages.filter((m) => m.parent === message.parent);
}

export function append(conv, message) {
  Object.assign(message, { id: newId(), parent: conv.leaf ?? null, seen: Date.now() });
  conv.messages.push(message);
  conv.leaf = message.id;
  return message;
}

// A new sibling of `message`: the branch that follows `message` stays in the tree.
export function branchFrom(conv, message, sibling) {
  conv.leaf = message.parent;
  return append(conv, sibling);
}

// Only a message with no replies is removed (a failed answer, an unanswered question).
export function removeLeaf(conv, message) {
  if (conv.messages.some((m) => m.parent === message.id)) return;
  conv.messages = conv.messages.filter((m) => m !== message);
  conv.notes = conv.notes.filter((n) => n.after !== message.id);
  if (conv.leaf === message.id) conv.leaf = message.parent;
}

// Shows `message`'s branch down to the reply last looked at on each level.
export function select(conv, message) {
  let leaf = message;
  for (;;) {
    const kids = conv.messages.filter((m) => m.parent === leaf.id);
    if (!kids.length) break;
    leaf = kids.reduce((a, b) => ((b.seen ?? 0) >= (a.seen ?? 0) ? b : a));
  }
  conv.leaf = leaf.id;
  const now = Date.now();
  for (const m of pathOf(conv)) m.seen = now;
}
