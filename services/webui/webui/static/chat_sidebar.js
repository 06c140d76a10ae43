// The chat page's sidebar: new chat, search, the conversation list (rename, delete), export and
// import, and the keyboard shortcuts' help.
import { pathOf } from "./branches.js";
import { chatsFromJson, chatsToJson, chatToMarkdown, download } from "./chat_io.js";
import { h } from "./dom.js";

export const SHORTCUTS = [
  ["Ctrl+Shift+O", "new chat"],
  ["Esc", "stop the answer"],
  ["Shift+Esc", "focus the message box"],
];

function matches(conv, query) {
  if (!query) return true;
  const q = query.toLowerCase();
  if (conv.title.toLowerCase().includes(q)) return true;
  return pathOf(conv).some((m) => (m.role === "user" ? m.content : (m.parts || []).map((p) => p.text).join("")).toLowerCase().includes(q));
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "chat";
}

// `chat` gives the sidebar what it acts on: conversations(), currentId(), busy(), open(id),
// remove(id), persist(), imported(list), startNew(), and error(message) to show a problem.
export function mountSidebar(chat) {
  const list = h("ul", { class: "conv-list", "data-testid": "conversation-list" });
  const search = h("input", { type: "search", placeholder: "Search chats", "aria-label": "Search chats", "data-testid": "chat-search" });
  const file = h("input", { type: "file", accept: "application/json,.json", hidden: true, "data-testid": "import-file" });
  const exportJson = h("button", { type: "button", class: "link", "data-testid": "export-json" }, "Export all (JSON)");
  const exportMd = h("button", { type: "button", class: "link", "data-testid": "export-markdown" }, "Export chat (Markdown)");
  const importButton = h("button", { type: "button", class: "link", "data-testid": "import" }, "Import…");
  const help = h("details", { class: "shortcuts", "data-testid": "shortcuts" },
    h("summary", { "aria-label": "Keyboard shortcuts" }, "⌨ Shortcuts"),
    h("dl", {}, ...SHORTCUTS.flatMap(([keys, what]) => [h("dt", {}, h("kbd", {}, keys)), h("dd", {}, what)])));
  const el = h("aside", { class: "sidebar", id: "sidebar" },
    h("button", { type: "button", class: "primary new-chat", "data-testid": "new-chat", title: "New chat (Ctrl+Shift+O)", onclick: () => chat.startNew() }, "+ New chat"),
    search, list,
    h("div", { class: "sidebar-tools" }, exportJson, exportMd, importButton, file), help);

  search.addEventListener("input", render);
  exportJson.addEventListener("click", () => download("nanochat-chats.json", "application/json", chatsToJson(chat.conversations())));
  exportMd.addEventListener("click", () => {
    const conv = chat.conversations().find((c) => c.id === chat.currentId());
    if (conv) download(`${slug(conv.title)}.md`, "text/markdown", chatToMarkdown(conv));
  });
  importButton.addEventListener("click", () => file.click());
  file.addEventListener("change", async () => {
    const picked = file.files[0];
    file.value = "";
    if (!picked) return;
    try {
      chat.imported(chatsFromJson(await picked.text(), new Set(chat.conversations().map((c) => c.id))));
    } catch (err) {
      chat.error(`Import failed: ${err.message}`);
    }
  });

  function item(conv) {
    const title = h("button", { type: "button", class: "conv-title", title: conv.title }, conv.title);
    title.addEventListener("click", () => chat.open(conv.id));
    const rename = h("button", { type: "button", class: "icon", "aria-label": `Rename ${conv.title}`, "data-testid": "rename" }, "✎");
    rename.addEventListener("click", () => {
      const input = h("input", { type: "text", value: conv.title, "aria-label": "Conversation name", "data-testid": "rename-input" });
      const done = (keep) => {
        if (keep && input.value.trim()) { conv.title = input.value.trim().slice(0, 80); chat.persist(); }
        render();
      };
      input.addEventListener("keydown", (e) => {
        if (e.key === "Enter") { e.preventDefault(); done(true); }
        if (e.key === "Escape") { e.stopPropagation(); done(false); }
      });
      input.addEventListener("blur", () => done(true));
      title.replaceWith(input);
      input.focus();
      input.select();
    });
    const remove = h("button", { type: "button", class: "icon", "aria-label": `Delete ${conv.title}`, "data-testid": "delete" }, "✕");
    remove.addEventListener("click", () => chat.remove(conv.id));
    return h("li", { class: conv.id === chat.currentId() ? "active" : "", "data-testid": "conversation" }, title, rename, remove);
  }

  function render() {
    list.replaceChildren(...chat.conversations().filter((c) => matches(c, search.value.trim())).map(item));
  }

  return { el, render };
}
