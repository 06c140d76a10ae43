// The chat page: streamed answers with Stop / Regenerate / Edit (both keep the old branch as a
// sibling, ‹ 1/2 ›), a system prompt and a model version per chat (the served one, an alias or a
// pinned version; each answer names the version that gave it), sampling settings, copy buttons,
// tokens/s.
import { ApiError, streamChat } from "./api.js";
import { append, branchFrom, pathOf, removeLeaf, select, siblingsOf } from "./branches.js";
import { mountSidebar } from "./chat_sidebar.js";
import { formatNumber, h } from "./dom.js";
import { copyButton, renderMarkdown } from "./markdown.js";
import { loadConversations, loadSettings, newConversation, saveConversations, saveSettings } from "./store.js";
import { isPinned, MODEL_REF, versionPicker } from "./version_picker.js";

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

// "N tokens · X tok/s": the rate counts from the first token, so it is the decoding speed.
function statsText(stats) {
  if (!stats || typeof stats.tokens !== "number") return "";
  const rate = stats.tokens > 1 && stats.seconds > 0 ? ` · ${formatNumber((stats.tokens - 1) / stats.seconds)} tok/s` : "";
  return `${stats.tokens} token${stats.tokens === 1 ? "" : "s"}${rate}`;
}

function settingsPanel(settings, onChange) {
  const field = (label, input) => h("label", {}, h("span", {}, label), input);
  const inputs = {
    system: h("textarea", { rows: 2, "data-setting": "system", placeholder: "For this chat only" }),
    temperature: h("input", { type: "number", min: 0, max: 2, step: 0.1, "data-setting": "temperature" }),
    top_k: h("input", { type: "number", min: 1, max: 200, step: 1, "data-setting": "top_k" }),
    max_tokens: h("input", { type: "number", min: 1, max: 4096, step: 1, "data-setting": "max_tokens" }),
  };
  const el = h("details", { class: "settings", "data-testid": "settings" },
    h("summary", {}, "Settings"),
    field("System prompt", inputs.system), field("Temperature", inputs.temperature),
    field("Top-k", inputs.top_k), field("Max tokens", inputs.max_tokens));
  for (const key of ["temperature", "top_k", "max_tokens"]) inputs[key].value = settings[key];
  el.addEventListener("change", () => {
    const num = (input, fallback) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : fallback);
    onChange({
      temperature: Math.min(2, Math.max(0, num(inputs.temperature, settings.temperature))),
      top_k: Math.max(1, Math.round(num(inputs.top_k, settings.top_k))),
      max_tokens: Math.max(1, Math.round(num(inputs.max_tokens, settings.max_tokens))),
    }, inputs.system.value);
  });
  return { el, system: inputs.system };
}

export function mountChat(root, app, pinned = null) {
  let conversations = loadConversations();
  let settings = loadSettings();
  let currentId = conversations[0]?.id ?? null;
  let controller = null;
  let retryTimer = null;

  const messages = h("div", { class: "messages", "data-testid": "messages", "aria-live": "polite" });
  const errorBox = h("div", { class: "chat-error", role: "alert", "data-testid": "chat-error", hidden: true });
  const prompt = h("textarea", { id: "prompt", rows: 1, placeholder: "Message nanochat (Enter sends, Shift+Enter for a new line)", "aria-label": "Message" });
  const send = h("button", { type: "submit", class: "primary", "data-testid": "send" }, "Send");
  const stop = h("button", { type: "button", class: "danger", "data-testid": "stop", title: "Stop (Esc)", hidden: true }, "Stop");
  const composer = h("form", { class: "composer" }, prompt, h("div", { class: "composer-buttons" }, stop, send));
  const current = () => conversations.find((c) => c.id === currentId) ?? null;
  const persist = () => saveConversations(conversations);
  const panel = settingsPanel(settings, (next, system) => {
    settings = next;
    saveSettings(settings);
    const conv = current() ?? createConversation();
    conv.system = system;
    persist();
  });
  const sidebar = mountSidebar({
    conversations: () => conversations,
    currentId: () => currentId,
    open(id) {
      if (controller) return;
      currentId = id;
      showConversation();
      document.body.classList.remove("sidebar-open");
    },
    remove(id) {
      if (controller && id === currentId) return;
      conversations = conversations.filter((c) => c.id !== id);
      if (currentId === id) currentId = conversations[0]?.id ?? null;
      persist();
      showConversation();
    },
    imported(list) {
      conversations = [...list, ...conversations];
      if (!controller && list.length) currentId = list[0].id;
      persist();
      showConversation();
    },
    persist,
    startNew,
    error: (message) => showError(new ApiError(0, "import_failed", message), null),
  });

  const picker = versionPicker((model) => {
    const conv = current() ?? createConversation();
    conv.model = model ?? undefined;
    persist();
    sidebar.render();
  });

  root.replaceChildren(h("div", { class: "chat" }, sidebar.el,
    h("section", { class: "chat-main" }, h("div", { class: "chat-head" }, picker.el), messages, errorBox, composer, panel.el)));

  function createConversation() {
    const conv = newConversation();
    conversations.unshift(conv);
    currentId = conv.id;
    return conv;
  }

  function showConversation() {
    clearError();
    panel.system.value = current()?.system ?? "";
    picker.show(current()?.model);
    sidebar.render();
    renderMessages();
  }

  function startNew() {
    if (controller) return;
    createConversation();
    persist();
    showConversation();
    document.body.classList.remove("sidebar-open");
    prompt.focus();
  }

  function switcher(conv, message) {
    const siblings = siblingsOf(conv, message);
    if (siblings.length < 2) return null;
    const at = siblings.indexOf(message);
    const go = (step) => () => {
      if (controller) return;
      select(conv, siblings[(at + step + siblings.length) % siblings.length]);
      persist();
      renderMessages();
    };
    return h("span", { class: "switcher", "data-testid": "branches" },
      h("button", { type: "button", class: "icon", "aria-label": "Previous version", "data-testid": "branch-prev", onclick: go(-1) }, "‹"),
      h("span", { "data-testid": "branch-count" }, `${at + 1}/${siblings.length}`),
      h("button", { type: "button", class: "icon", "aria-label": "Next version", "data-testid": "branch-next", onclick: go(1) }, "›"));
  }

  function messageView(message, isLast, conv) {
    const el = h("div", { class: `msg ${message.role}`, "data-testid": "message", "data-role": message.role, "data-state": message.state || "done" });
    const body = h("div", { class: "body" });
    el.append(body);
    const text = message.role === "user" ? message.content : textOf(message.parts);
    const actions = h("div", { class: "actions" }, switcher(conv, message));
    if (message.role === "user") {
      body.textContent = message.content;
      const edit = h("button", { type: "button", class: "link", "data-testid": "edit" }, "Edit");
      edit.addEventListener("click", () => editMessage(el, body, message));
      actions.append(copyButton(() => text, "Copy message", "copy-message", "link"), edit);
    } else {
      body.append(renderParts(message.parts));
      // The version that answered, as inference names it (`nanochat:3`); older answers kept the served card.
      const meta = [message.answeredBy || modelLabel(message.model)];
      if (message.state === "stopped" || message.state === "interrupted") meta.push(message.state);
      actions.append(h("span", { class: "meta", "data-testid": "answered-by" }, meta.join(" · ")),
        h("span", { class: "meta stats", "data-testid": "stats" }, statsText(message.stats)));
      if (message.state !== "streaming") actions.append(copyButton(() => textOf(message.parts), "Copy answer", "copy-message", "link"));
      if (isLast && message.state !== "streaming") {
        actions.append(h("button", { type: "button", class: "link", "data-testid": "regenerate", onclick: () => regenerate(message) }, "Regenerate"));
      }
    }
    el.append(actions);
    return el;
  }

  function noteViews(conv, after) {
    return conv.notes.filter((n) => n.after === after).map((n) => h("div", { class: "note", "data-testid": "model-note" }, n.text));
  }

  function renderMessages() {
    const conv = current();
    const path = conv ? pathOf(conv) : [];
    if (!path.length) {
      messages.replaceChildren(h("div", { class: "empty" },
        h("h2", {}, "Chat with nanochat"),
        h("p", {}, conv?.model ? `This chat talks to ${conv.model}.` : `Serving: ${modelLabel(app.model())}`)));
      return;
    }
    messages.replaceChildren(...noteViews(conv, null),
      ...path.flatMap((m, i) => [messageView(m, i === path.length - 1, conv), ...noteViews(conv, m.id)]));
    messages.scrollTop = messages.scrollHeight;
  }

  function editMessage(el, body, message) {
    if (controller) return;
    const conv = current();
    const input = h("textarea", { class: "edit-box", rows: 3, "data-testid": "edit-input", "aria-label": "Edit message" });
    input.value = message.content;
    const save = h("button", { type: "button", class: "primary", "data-testid": "edit-save" }, "Save & send");
    const cancel = h("button", { type: "button" }, "Cancel");
    cancel.addEventListener("click", renderMessages);
    save.addEventListener("click", () => {
      const text = input.value.trim();
      if (!text) return;
      // The old message and what followed it stay as a sibling branch.
      branchFrom(conv, message, { role: "user", content: text });
      generate(conv);
    });
    body.replaceChildren(input, h("div", { class: "edit-buttons" }, cancel, save));
    el.querySelector(".actions")?.remove();
    input.focus();
  }

  function regenerate(message) {
    const conv = current();
    if (controller || !conv) return;
    // A new answer is a sibling of the old one; after an unanswered question it is its first.
    if (message.role === "assistant") conv.leaf = message.parent;
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
    const text = h("span", {}, err.message);
    errorBox.replaceChildren(text);
    if (conv) {
      const retry = h("button", { type: "button", "data-testid": "retry" }, "Retry");
      retry.addEventListener("click", () => { clearError(); generate(conv); });
      errorBox.append(retry);
    }
    errorBox.dataset.code = err.code || "";
    errorBox.hidden = false;
    if (conv && err.status === 429) {
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
    const out = conv.system?.trim() ? [{ role: "system", content: conv.system.trim() }] : [];
    for (const m of pathOf(conv)) {
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
    const payload = {
      model: conv.model || app.model()?.id || "nanochat",
      messages: toApiMessages(conv),
      temperature: settings.temperature,
      top_k: settings.top_k,
      max_tokens: settings.max_tokens,
    };
    const assistant = append(conv, { role: "assistant", parts: [], model: conv.model ? null : app.model(), state: "streaming" });
    conv.updated = Date.now();
    persist();
    renderMessages();
    const body = messages.lastElementChild.querySelector(".body");
    controller = new AbortController();
    setGenerating(true);
    let frame = 0;
    let saved = Date.now();
    let chunks = 0;
    let first = null;
    let usage = null;
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
        if (chunk.usage) usage = chunk.usage;
        if (typeof chunk.model === "string" && chunk.model !== assistant.answeredBy) assistant.answeredBy = chunk.model;
        const delta = chunk.choices?.[0]?.delta;
        if (!delta) return;
        if (delta.content || delta.nanochat_tool) {
          chunks += 1;
          first ??= performance.now();
        }
        if (delta.content) appendPart(assistant, "text", delta.content);
        if (delta.nanochat_tool?.text !== undefined) appendPart(assistant, delta.nanochat_tool.type, delta.nanochat_tool.text);
        if (!frame) frame = requestAnimationFrame(paint);
      });
      assistant.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        assistant.state = "stopped";
      } else {
        if (assistant.parts.length === 0) removeLeaf(conv, assistant);
        else assistant.state = "error";
        showError(err instanceof ApiError ? err : new ApiError(0, "error", String(err.message || err)), conv);
      }
    } finally {
      cancelAnimationFrame(frame);
      // The server's count when it sent one (a stopped answer has none): else one token a chunk.
      if (first !== null || usage) {
        assistant.stats = { tokens: usage?.completion_tokens ?? chunks, seconds: first === null ? 0 : (performance.now() - first) / 1000 };
      }
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
    const conv = current() ?? createConversation();
    // An unanswered message (its request failed) is replaced: the user chose to say something else.
    const leaf = pathOf(conv).at(-1);
    if (leaf?.role === "user") removeLeaf(conv, leaf);
    if (!conv.messages.some((m) => m.role === "user")) conv.title = text.replace(/\s+/g, " ").slice(0, 48);
    append(conv, { role: "user", content: text });
    prompt.value = "";
    sidebar.render();
    generate(conv);
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller?.abort());

  // Shortcuts (listed in the sidebar's help): new chat, stop, focus the message box.
  const onKey = (e) => {
    if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); startNew(); return; }
    if (e.key === "Escape" && e.shiftKey) { e.preventDefault(); prompt.focus(); return; }
    if (e.key === "Escape" && controller && !document.querySelector("dialog[open]")) { e.preventDefault(); controller.abort(); }
  };
  document.addEventListener("keydown", onKey);

  // "Chat with this version" (the models page) opens a new chat pinned to it.
  if (pinned && MODEL_REF.test(pinned)) {
    createConversation().model = pinned;
    persist();
    history.replaceState(null, "", "#/chat");
  }
  showConversation();
  picker.load(app.model()?.id);

  return {
    // Called by the app when the serving model changes, so the chat shows where it happened.
    modelChanged(before, after) {
      const conv = current();
      const path = conv ? pathOf(conv) : [];
      if (!path.length) { renderMessages(); return; }
      // A chat pinned to a version or an alias is not answered by the served model.
      if (isPinned(conv.model)) return;
      // While an answer streams, the note goes before it (it stays the last message).
      const anchor = controller ? path.at(-1).parent : path.at(-1).id;
      conv.notes.push({ after: anchor, text: `The serving model changed: ${modelLabel(before)} → ${modelLabel(after)}.` });
      persist();
      if (!controller) renderMessages();
    },
    unmount() {
      controller?.abort();
      clearError();
      document.removeEventListener("keydown", onKey);
    },
  };
}
