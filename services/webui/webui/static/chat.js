// The chat page: conversation list, streamed answers with Stop / Regenerate / Edit, settings.
import { ApiError, streamChat } from "./api.js";
import { h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { loadConversations, loadSettings, newConversation, saveConversations, saveSettings } from "./store.js";

export function modelLabel(model) {
  if (!model) return "no model";
  const version = model.version !== undefined && model.version !== null ? ` v${model.version}` : "";
  return `${model.id || "nanochat"}${version}${model.stage ? ` · ${model.stage}` : ""}`;
}

function textOf(parts) {
  return parts.filter((p) => p.type === "text").map((p) => p.text).join("");
}

function appendPart(message, type, text) {
  const last = message.parts[message.parts.length - 1];
  if (last && last.type === type) last.text += text;
  else message.parts.push({ type, text });
}

function renderParts(parts) {
  const body = document.createDocumentFragment();
  for (const part of parts) {
    if (part.type === "python") {
      body.append(h("div", { class: "tool", "data-testid": "tool-call" },
        h("span", { class: "tool-label" }, "calculator"), h("code", {}, part.text)));
    } else if (part.type === "python_output") {
      body.append(h("div", { class: "tool tool-output", "data-testid": "tool-output" },
        h("span", { class: "tool-label" }, "result"), h("code", {}, part.text)));
    } else {
      body.append(renderMarkdown(part.text));
    }
  }
  return body;
}

export function mountChat(root, app) {
  let conversations = loadConversations();
  let settings = loadSettings();
  let currentId = conversations[0]?.id ?? null;
  let controller = null;
  let retryTimer = null;

  const list = h("ul", { class: "conv-list", "data-testid": "conversation-list" });
  const messages = h("div", { class: "messages", "data-testid": "messages", "aria-live": "polite" });
  const errorBox = h("div", { class: "chat-error", role: "alert", "data-testid": "chat-error", hidden: true });
  const prompt = h("textarea", { id: "prompt", rows: 1, placeholder: "Message nanochat (Enter sends, Shift+Enter for a new line)", "aria-label": "Message" });
  const send = h("button", { type: "submit", class: "primary", "data-testid": "send" }, "Send");
  const stop = h("button", { type: "button", class: "danger", "data-testid": "stop", hidden: true }, "Stop");
  const field = (label, input) => h("label", {}, h("span", {}, label), input);
  const systemInput = h("textarea", { rows: 2, "data-setting": "system" });
  const temperatureInput = h("input", { type: "number", min: 0, max: 2, step: 0.1, "data-setting": "temperature" });
  const topKInput = h("input", { type: "number", min: 1, max: 200, step: 1, "data-setting": "top_k" });
  const maxTokensInput = h("input", { type: "number", min: 1, max: 4096, step: 1, "data-setting": "max_tokens" });
  const settingsPanel = h("details", { class: "settings", "data-testid": "settings" },
    h("summary", {}, "Settings"),
    field("System prompt", systemInput), field("Temperature", temperatureInput),
    field("Top-k", topKInput), field("Max tokens", maxTokensInput));
  const composer = h("form", { class: "composer" }, prompt, h("div", { class: "composer-buttons" }, stop, send));

  root.replaceChildren(h("div", { class: "chat" },
    h("aside", { class: "sidebar", id: "sidebar" },
      h("button", { type: "button", class: "primary new-chat", "data-testid": "new-chat", onclick: startNew }, "+ New chat"),
      list),
    h("section", { class: "chat-main" }, messages, errorBox, composer, settingsPanel)));

  systemInput.value = settings.system;
  temperatureInput.value = settings.temperature;
  topKInput.value = settings.top_k;
  maxTokensInput.value = settings.max_tokens;
  settingsPanel.addEventListener("change", () => {
    const num = (input, fallback) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : fallback);
    settings = {
      system: systemInput.value,
      temperature: Math.min(2, Math.max(0, num(temperatureInput, settings.temperature))),
      top_k: Math.max(1, Math.round(num(topKInput, settings.top_k))),
      max_tokens: Math.max(1, Math.round(num(maxTokensInput, settings.max_tokens))),
    };
    saveSettings(settings);
  });

  const current = () => conversations.find((c) => c.id === currentId) ?? null;
  const persist = () => saveConversations(conversations);

  function startNew() {
    const conv = newConversation();
    conversations.unshift(conv);
    currentId = conv.id;
    persist();
    clearError();
    renderList();
    renderMessages();
    document.body.classList.remove("sidebar-open");
    prompt.focus();
  }

  function renderList() {
    list.replaceChildren(...conversations.map((conv) => {
      const title = h("button", { type: "button", class: "conv-title", title: conv.title }, conv.title);
      title.addEventListener("click", () => {
        if (controller) return;
        currentId = conv.id;
        clearError();
        renderList();
        renderMessages();
        document.body.classList.remove("sidebar-open");
      });
      const rename = h("button", { type: "button", class: "icon", "aria-label": `Rename ${conv.title}`, "data-testid": "rename" }, "✎");
      rename.addEventListener("click", () => {
        const input = h("input", { type: "text", value: conv.title, "aria-label": "Conversation name", "data-testid": "rename-input" });
        const done = (keep) => {
          if (keep && input.value.trim()) { conv.title = input.value.trim().slice(0, 80); persist(); }
          renderList();
        };
        input.addEventListener("keydown", (e) => {
          if (e.key === "Enter") { e.preventDefault(); done(true); }
          if (e.key === "Escape") done(false);
        });
        input.addEventListener("blur", () => done(true));
        title.replaceWith(input);
        input.focus();
        input.select();
      });
      const remove = h("button", { type: "button", class: "icon", "aria-label": `Delete ${conv.title}`, "data-testid": "delete" }, "✕");
      remove.addEventListener("click", () => {
        if (controller && conv.id === currentId) return;
        conversations = conversations.filter((c) => c.id !== conv.id);
        if (currentId === conv.id) currentId = conversations[0]?.id ?? null;
        persist();
        renderList();
        renderMessages();
      });
      return h("li", { class: conv.id === currentId ? "active" : "", "data-testid": "conversation" }, title, rename, remove);
    }));
  }

  function messageView(message, index, conv) {
    if (message.role === "note") return h("div", { class: "note", "data-testid": "model-note" }, message.text);
    const isLast = index === conv.messages.length - 1;
    const el = h("div", { class: `msg ${message.role}`, "data-testid": "message", "data-role": message.role, "data-state": message.state || "done" });
    const body = h("div", { class: "body" });
    el.append(body);
    if (message.role === "user") {
      body.textContent = message.content;
      const edit = h("button", { type: "button", class: "link", "data-testid": "edit" }, "Edit");
      edit.addEventListener("click", () => editMessage(el, body, index));
      el.append(h("div", { class: "actions" }, edit));
    } else {
      body.append(renderParts(message.parts));
      const meta = [modelLabel(message.model)];
      if (message.state === "stopped" || message.state === "interrupted") meta.push(message.state);
      const actions = h("div", { class: "actions" }, h("span", { class: "meta" }, meta.join(" · ")));
      if (isLast && message.state !== "streaming") {
        actions.append(h("button", { type: "button", class: "link", "data-testid": "regenerate", onclick: regenerate }, "Regenerate"));
      }
      el.append(actions);
    }
    return el;
  }

  function renderMessages() {
    const conv = current();
    if (!conv || conv.messages.length === 0) {
      messages.replaceChildren(h("div", { class: "empty" },
        h("h2", {}, "Chat with nanochat"),
        h("p", {}, `Serving: ${modelLabel(app.model())}`)));
      return;
    }
    messages.replaceChildren(...conv.messages.map((m, i) => messageView(m, i, conv)));
    messages.scrollTop = messages.scrollHeight;
  }

  function editMessage(el, body, index) {
    if (controller) return;
    const conv = current();
    const input = h("textarea", { class: "edit-box", rows: 3, "data-testid": "edit-input" });
    input.value = conv.messages[index].content;
    const save = h("button", { type: "button", class: "primary", "data-testid": "edit-save" }, "Save & send");
    const cancel = h("button", { type: "button" }, "Cancel");
    cancel.addEventListener("click", renderMessages);
    save.addEventListener("click", () => {
      const text = input.value.trim();
      if (!text) return;
      // Everything after the edited message belonged to the old branch of the conversation.
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: text });
      generate(conv);
    });
    body.replaceChildren(input, h("div", { class: "edit-buttons" }, cancel, save));
    el.querySelector(".actions")?.remove();
    input.focus();
  }

  function regenerate() {
    const conv = current();
    if (controller || !conv) return;
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === "assistant") conv.messages.pop();
    generate(conv);
  }

  function clearError() {
    clearInterval(retryTimer);
    retryTimer = null;
    errorBox.hidden = true;
    errorBox.replaceChildren();
  }

  function showError(err, conv) {
    clearError();
    const retry = h("button", { type: "button", "data-testid": "retry" }, "Retry");
    retry.addEventListener("click", () => { clearError(); generate(conv); });
    const text = h("span", {}, err.message);
    errorBox.replaceChildren(text, retry);
    errorBox.dataset.code = err.code || "";
    errorBox.hidden = false;
    if (err.status === 429) {
      // A full queue is temporary: count down the server's Retry-After and try again by itself.
      let left = Math.max(1, Math.ceil(err.retryAfter ?? 5));
      const tick = () => { text.textContent = `${err.message} Retrying in ${left} s.`; };
      tick();
      retryTimer = setInterval(() => {
        left -= 1;
        if (left > 0) { tick(); return; }
        clearError();
        generate(conv);
      }, 1000);
    }
  }

  function toApiMessages(conv) {
    const out = settings.system.trim() ? [{ role: "system", content: settings.system.trim() }] : [];
    for (const m of conv.messages) {
      if (m.role === "user") out.push({ role: "user", content: m.content });
      // Tool parts go back as nanochat_parts so calculator turns survive the round trip.
      else if (m.role === "assistant" && m.parts.length) out.push({ role: "assistant", content: textOf(m.parts), nanochat_parts: m.parts });
    }
    return out;
  }

  function setGenerating(on) {
    send.hidden = on;
    stop.hidden = !on;
    root.querySelector(".chat").classList.toggle("generating", on);
  }

  async function generate(conv) {
    clearError();
    const assistant = { role: "assistant", parts: [], model: app.model(), state: "streaming" };
    const payload = {
      model: app.model()?.id || "nanochat",
      messages: toApiMessages(conv),
      temperature: settings.temperature,
      top_k: settings.top_k,
      max_tokens: settings.max_tokens,
    };
    conv.messages.push(assistant);
    conv.updated = Date.now();
    persist();
    renderMessages();
    const view = messages.lastElementChild;
    const body = view.querySelector(".body");
    controller = new AbortController();
    setGenerating(true);
    let frame = 0;
    let saved = Date.now();
    const paint = () => {
      frame = 0;
      body.replaceChildren(renderParts(assistant.parts));
      messages.scrollTop = messages.scrollHeight;
      // Saved about once a second, so a reload mid-answer keeps what had arrived.
      if (Date.now() - saved > 1000) {
        saved = Date.now();
        persist();
      }
    };
    try {
      await streamChat(payload, controller.signal, (chunk) => {
        const delta = chunk.choices?.[0]?.delta;
        if (!delta) return;
        if (delta.content) appendPart(assistant, "text", delta.content);
        if (delta.nanochat_tool?.text !== undefined) appendPart(assistant, delta.nanochat_tool.type, delta.nanochat_tool.text);
        if (!frame) frame = requestAnimationFrame(paint);
      });
      assistant.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        assistant.state = "stopped";
      } else {
        if (assistant.parts.length === 0) conv.messages.pop();
        else assistant.state = "error";
        showError(err instanceof ApiError ? err : new ApiError(0, "error", String(err.message || err)), conv);
      }
    } finally {
      cancelAnimationFrame(frame);
      controller = null;
      setGenerating(false);
      persist();
      renderMessages();
    }
  }

  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    let conv = current();
    if (!conv) {
      conv = newConversation();
      conversations.unshift(conv);
      currentId = conv.id;
    }
    // An unanswered message (its request failed) is replaced: the user chose to say something else.
    if (conv.messages.at(-1)?.role === "user") conv.messages.pop();
    if (!conv.messages.some((m) => m.role === "user")) conv.title = text.replace(/\s+/g, " ").slice(0, 48);
    conv.messages.push({ role: "user", content: text });
    prompt.value = "";
    renderList();
    generate(conv);
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller?.abort());

  renderList();
  renderMessages();

  return {
    // Called by the app when the serving model changes, so the chat shows where it happened.
    modelChanged(before, after) {
      const conv = current();
      if (!conv || conv.messages.length === 0) { renderMessages(); return; }
      const note = { role: "note", text: `The serving model changed: ${modelLabel(before)} → ${modelLabel(after)}.` };
      // While an answer streams, it stays the last message (its Regenerate button hangs on that).
      conv.messages.splice(controller ? conv.messages.length - 1 : conv.messages.length, 0, note);
      persist();
      if (!controller) renderMessages();
    },
    unmount() {
      controller?.abort();
      clearError();
    },
  };
}
