"""The web UI in a real browser: Playwright drives Debian's Chromium (nanochat_testing.browser)
against the web UI server process, which proxies to the fake upstream process
(webui_fake_upstream.py). Every wait is for a state of the page or of the server, never a fixed
sleep. Screenshots go to tests/output/."""

import httpx
import pytest
from conftest import ADMIN_TOKEN, CHAT_TOKEN, OUTPUT, poll, start_fake, start_webui
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.slow

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def open_page(browser, url: str, viewport=DESKTOP, token: str | None = CHAT_TOKEN) -> Page:
    """A new browser context on `url`, signed in with `token` first (chat needs a session here:
    the inference service has a token); None opens it signed out."""
    context = browser.new_context(viewport=viewport)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    if token is not None:
        # The context's request API shares the browser's cookie jar.
        assert context.request.post(f"{url.split('#')[0].rstrip('/')}/api/session", data={"token": token}).ok
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_assistant(page: Page):
    return page.locator("[data-testid=message][data-role=assistant]").last


def fake_state(fake) -> dict:
    return httpx.get(f"{fake.url}/inference/_test/state").json()


def test_stream_grows_and_stop_frees_the_server_request(browser, webui, fake):
    page = open_page(browser, webui.url)
    expect(page.get_by_test_id("model-badge")).to_have_text("nanochat v4 · sft")
    before = fake_state(fake)["disconnected"]
    send(page, "tell me a slow story")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(answer.locator(".body")).to_contain_text("word3")
    seen = len(answer.locator(".body").inner_text())
    # Still streaming, and the text keeps growing: tokens arrive one by one.
    page.wait_for_function(
        "([n]) => { const m = [...document.querySelectorAll('[data-role=assistant]')].pop();"
        " return m.dataset.state === 'streaming' && m.querySelector('.body').innerText.length > n + 20; }",
        arg=[seen],
    )
    page.get_by_test_id("stop").click()
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.get_by_test_id("send")).to_be_visible()
    state = poll(lambda: (s := fake_state(fake))["active"] == 0 and s)
    assert state["disconnected"] == before + 1
    stopped_text = answer.locator(".body").inner_text()
    assert "word1999" not in stopped_text
    page.screenshot(path=OUTPUT / "chat-stopped-desktop.png")
    assert page.errors == []


def test_reload_mid_answer_keeps_the_partial_reply_as_interrupted(browser, webui, fake):
    page = open_page(browser, webui.url)
    send(page, "tell me a slow story")
    answer = last_assistant(page)
    # A second's worth of words: the reply has been saved at least once while streaming.
    expect(answer.locator(".body")).to_contain_text("word40 ")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "interrupted")
    expect(answer.locator(".body")).to_contain_text("word1 ")
    expect(answer).to_contain_text("interrupted")
    expect(page.get_by_test_id("send")).to_be_visible()
    page.get_by_test_id("regenerate").click()
    expect(last_assistant(page)).to_have_attribute("data-state", "streaming")
    page.get_by_test_id("stop").click()
    expect(last_assistant(page)).to_have_attribute("data-state", "stopped")
    expect(page.locator("[data-testid=message]")).to_have_count(2)
    assert page.errors == []


def test_regenerate_edit_and_history_survive_reload(browser, webui, fake):
    page = open_page(browser, webui.url)
    send(page, "hello there")
    expect(last_assistant(page)).to_have_attribute("data-state", "done")
    first = last_assistant(page).locator(".body").inner_text()
    assert "You said: hello there" in first

    page.get_by_test_id("regenerate").click()
    expect(last_assistant(page).locator(".body")).not_to_have_text(first)
    expect(last_assistant(page)).to_have_attribute("data-state", "done")
    expect(page.locator("[data-testid=message]")).to_have_count(2)
    regenerated = fake_state(fake)["last_chat"]["messages"]
    assert [m["role"] for m in regenerated] == ["user"]

    send(page, "second question")
    expect(page.locator("[data-testid=message]")).to_have_count(4)
    expect(last_assistant(page)).to_have_attribute("data-state", "done")
    page.locator("[data-testid=message][data-role=user]").first.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("an edited first question")
    page.get_by_test_id("edit-save").click()
    expect(last_assistant(page)).to_have_attribute("data-state", "done")
    expect(page.locator("[data-testid=message]")).to_have_count(2)
    expect(last_assistant(page).locator(".body")).to_contain_text("You said: an edited first question")
    sent = fake_state(fake)["last_chat"]["messages"]
    assert sent == [{"role": "user", "content": "an edited first question"}]

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("[data-testid=message]")).to_have_count(2)
    expect(page.get_by_test_id("conversation")).to_have_count(1)
    expect(page.get_by_test_id("conversation").first).to_contain_text("hello there")

    page.get_by_test_id("rename").first.click()
    page.get_by_test_id("rename-input").fill("Renamed chat")
    page.get_by_test_id("rename-input").press("Enter")
    page.reload()
    expect(page.get_by_test_id("conversation").first).to_contain_text("Renamed chat")
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("conversation")).to_have_count(2)
    page.get_by_test_id("delete").last.click()
    expect(page.get_by_test_id("conversation")).to_have_count(1)
    expect(page.get_by_test_id("conversation")).not_to_contain_text("Renamed chat")
    assert page.errors == []


def test_markdown_is_sanitised_tools_and_code_render(browser, webui, fake):
    page = open_page(browser, webui.url)
    send(page, "show me xss")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".body")).to_contain_text("<script>window.__xss = 1</script>")
    expect(answer.locator(".body")).to_contain_text('<img src=x onerror="window.__xss = 2">')
    assert answer.locator("script, img, [onerror]").count() == 0
    assert answer.locator("a[href^=javascript]").count() == 0
    expect(answer.locator("strong")).to_have_text("Bold")
    assert page.evaluate("window.__xss") is None

    send(page, "calc 12 times 7")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.get_by_test_id("tool-call")).to_contain_text("12*7")
    expect(answer.get_by_test_id("tool-output")).to_contain_text("84")

    send(page, "some code please")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".codeblock code")).to_have_text("print('hello')")
    answer.locator(".codeblock .copy").click()
    expect(answer.locator(".codeblock .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hello')"
    # The calculator turn went back to the server with its parts, so the tool use survives.
    history = fake_state(fake)["last_chat"]["messages"]
    tool_turn = next(
        m
        for m in history
        if m["role"] == "assistant"
        and "nanochat_parts" in m
        and any(p["type"] == "python" for p in m["nanochat_parts"])
    )
    assert {"type": "python_output", "text": "84"} in tool_turn["nanochat_parts"]
    page.screenshot(path=OUTPUT / "chat-desktop.png")
    page.set_viewport_size(PHONE)
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    page.screenshot(path=OUTPUT / "chat-phone.png")
    page.get_by_role("button", name="Conversations").click()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    # The sidebar slides in (a CSS transition): the picture is taken once it is all in.
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    page.screenshot(path=OUTPUT / "chat-phone-sidebar.png")
    assert page.errors == []


def test_error_states_context_queue_full_and_inference_down(browser, webui):
    page = open_page(browser, webui.url)
    send(page, "so much context")
    expect(page.get_by_test_id("chat-error")).to_contain_text("too long for the model's context")
    expect(page.get_by_test_id("chat-error")).to_contain_text("2048")

    send(page, "are you busy")
    expect(page.get_by_test_id("chat-error")).to_contain_text("queue is full")
    expect(page.get_by_test_id("chat-error")).to_contain_text("Retrying in")
    # It retries by itself after Retry-After and the answer arrives.
    expect(last_assistant(page)).to_have_attribute("data-state", "done", timeout=10_000)
    expect(page.get_by_test_id("chat-error")).to_be_hidden()

    own_fake = start_fake()
    own_webui = start_webui(own_fake.url)
    try:
        page = open_page(browser, own_webui.url)
        expect(page.get_by_test_id("model-badge")).to_have_text("nanochat v4 · sft")
        own_fake.stop()
        expect(page.get_by_test_id("banner")).to_contain_text("inference service is down", timeout=10_000)
        expect(page.get_by_test_id("model-badge")).to_have_text("inference unavailable")
        send(page, "hello?")
        expect(page.get_by_test_id("chat-error")).to_contain_text("inference service is down")
        page.screenshot(path=OUTPUT / "chat-inference-down.png")
    finally:
        own_webui.stop()
        own_fake.stop()


def test_job_progress_charts_and_log_follow_reconnect(browser, webui, fake):
    page = open_page(browser, f"{webui.url}/#/jobs")
    row = page.locator("[data-testid=job-row][data-job=job-1]")
    expect(row.get_by_test_id("status")).to_have_text("running")
    before = int(row.get_by_test_id("progress").get_attribute("aria-valuenow"))
    httpx.post(f"{fake.url}/trainer/_test/step")
    expect(row.get_by_test_id("progress")).not_to_have_attribute("aria-valuenow", str(before))

    row.get_by_role("link").click()
    expect(page.get_by_test_id("log-state")).to_have_text("following")
    points = int(page.get_by_test_id("chart-loss").get_attribute("data-points"))
    progress = page.get_by_test_id("progress").get_attribute("aria-valuenow")
    step = httpx.post(f"{fake.url}/trainer/_test/step").json()["step"]
    expect(page.get_by_test_id("chart-loss")).to_have_attribute("data-points", str(points + 1))
    expect(page.get_by_test_id("chart-tok_per_s")).to_have_attribute("data-points", str(points + 1))
    expect(page.get_by_test_id("progress")).not_to_have_attribute("aria-valuenow", progress)
    expect(page.get_by_test_id("log")).to_contain_text(f"step {step:05d}")

    # The trainer drops the stream; lines written meanwhile arrive after the reconnect, once each.
    httpx.post(f"{fake.url}/trainer/_test/drop")
    expect(page.get_by_test_id("log-state")).to_have_text("reconnecting…")
    for _ in range(3):
        step = httpx.post(f"{fake.url}/trainer/_test/step").json()["step"]
    expect(page.get_by_test_id("log")).to_contain_text(f"step {step:05d}", timeout=15_000)
    lines = page.get_by_test_id("log").inner_text().splitlines()
    assert lines == ["starting base_train"] + [f"step {n:05d} loss {10.0 / (1 + n):.4f}" for n in range(1, step + 1)]
    page.screenshot(path=OUTPUT / "dashboard-job-desktop.png", full_page=True)

    # Another stage's curves on request, and they stay while the job moves on.
    pick = page.get_by_test_id("curve-stage")
    expect(pick).to_have_value("base_train")
    pick.select_option("tok_train")
    expect(page.get_by_test_id("chart-loss")).to_have_attribute("data-points", "3")
    httpx.post(f"{fake.url}/trainer/_test/step")
    expect(page.get_by_test_id("log")).to_contain_text(f"step {step + 1:05d}")
    expect(page.get_by_test_id("chart-loss")).to_have_attribute("data-points", "3")
    expect(pick).to_have_value("tok_train")
    page.set_viewport_size(PHONE)
    page.screenshot(path=OUTPUT / "dashboard-job-phone.png", full_page=True)
    assert page.errors == []


def test_job_page_shows_its_attempts_when_the_trainer_reports_them(browser, webui):
    page = open_page(browser, f"{webui.url}/#/jobs/job-retried")
    rows = page.get_by_test_id("attempt-row")
    expect(rows).to_have_count(2)
    expect(page.get_by_test_id("attempts")).to_contain_text("worker lost: no heartbeat for 30 s")
    expect(rows.last).to_contain_text("worker-b")
    expect(rows.last).to_contain_text("step 100")
    expect(page.get_by_test_id("status")).to_have_text("running")
    expect(page.locator(".details").first).to_contain_text("attempt2 of 3")
    page.screenshot(path=OUTPUT / "dashboard-job-attempts-desktop.png", full_page=True)
    # A job without the field (an older trainer) has no table, and its page works as before.
    page.goto(f"{webui.url}/#/jobs/job-1")
    expect(page.get_by_test_id("log-state")).to_have_text("following")
    expect(page.get_by_test_id("attempts")).to_have_count(0)
    assert page.errors == []


def test_a_refused_log_stream_is_retried_until_a_slot_frees(browser, fake):
    own_webui = start_webui(fake.url, WEBUI_MAX_STREAMS="1")
    try:
        with (
            httpx.Client(timeout=10) as http,
            http.stream("GET", f"{own_webui.url}/api/trainer/v1/jobs/job-1/logs?follow=true"),
        ):
            # The one stream slot is taken: the page's follow gets a 429, which EventSource gives up on.
            page = open_page(browser, f"{own_webui.url}/#/jobs/job-1")
            expect(page.get_by_test_id("log-state")).to_have_text("reconnecting…")
        expect(page.get_by_test_id("log-state")).to_have_text("following", timeout=15_000)
        expect(page.get_by_test_id("log")).to_contain_text("starting base_train")
        assert page.errors == []
    finally:
        own_webui.stop()


def test_launch_form_validates_at_the_field_and_models_serving_alias(browser, webui, fake):
    page = open_page(browser, f"{webui.url}/#/launch", token=None)
    expect(page.get_by_test_id("form-error")).to_contain_text("needs the admin token")
    page.click("#login-button")
    page.fill("#login-dialog input", ADMIN_TOKEN)
    page.click("#login-dialog button.primary")
    expect(page.locator("#login-button")).to_have_text("Sign out (admin)")

    page.get_by_test_id("launch-what").select_option("base_train")
    page.fill("#opt-depth", "0")
    page.get_by_test_id("launch-submit").click()
    expect(page.get_by_test_id("error-depth")).to_have_text("Must be at least 1.")
    # A rule only the trainer knows comes back as 422 and lands at the same field.
    page.fill("#opt-depth", "5")
    page.get_by_test_id("launch-submit").click()
    expect(page.get_by_test_id("error-depth")).to_contain_text("power of two")
    page.fill("#opt-depth", "4")
    page.get_by_test_id("launch-submit").click()
    expect(page).to_have_url(f"{webui.url}/#/jobs/job-{len(httpx.get(f'{fake.url}/trainer/v1/jobs').json()['items'])}")
    created = httpx.get(f"{fake.url}/trainer/v1/jobs").json()["items"][-1]["request"]
    assert created["options"]["depth"] == 4 and created["input"] == {"name": "nanochat", "stage": "tokenizer"}
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("status")).to_have_text("cancelled")

    page.goto(f"{webui.url}/#/models")
    expect(page.get_by_test_id("lineage-node")).to_have_count(4)
    expect(page.get_by_test_id("lineage")).to_contain_text("tokenizer")
    page.locator("[data-testid=version-row][data-version='5']").click()
    expect(page.get_by_test_id("lineage-node")).to_have_count(5)
    expect(page.get_by_test_id("lineage-node").last).to_contain_text("rl")
    page.locator("[data-testid=version-row][data-version='4']").get_by_role("button", name="Report card").click()
    expect(page.get_by_test_id("report")).to_contain_text("<script>window.__xss=4</script>")
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=OUTPUT / "dashboard-models-desktop.png", full_page=True)

    # Chat open in another tab notes the model change once the serving alias moves.
    chat = page.context.new_page()
    chat.goto(webui.url)
    send(chat, "before the swap")
    expect(last_assistant(chat)).to_have_attribute("data-state", "done")
    page.locator("[data-testid=version-row][data-version='5']").get_by_test_id("set-serving").click()
    expect(page.locator("[data-testid=version-row][data-version='5']").get_by_test_id("alias")).to_have_text("serving")
    expect(chat.get_by_test_id("model-badge")).to_have_text("nanochat v5 · rl", timeout=10_000)
    expect(chat.get_by_test_id("model-note")).to_contain_text("nanochat v4 · sft → nanochat v5 · rl")
    assert page.errors == []


def test_numbers_are_formatted_for_reading(browser, webui):
    page = open_page(browser, webui.url)
    shown = page.evaluate(
        "async (values) => { const { formatNumber } = await import('/dom.js'); return values.map(formatNumber); }",
        [1200.4, 12930.5, 1.2345, 0.00012, 100000, 0.31, 5269.9],
    )
    assert shown == ["1200", "12.93K", "1.234", "1.20e-4", "100,000", "0.31", "5270"]


def test_shift_enter_writes_a_new_line_and_enter_sends(browser, webui, fake):
    page = open_page(browser, webui.url)
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "second line")
    expect(page.locator("[data-testid=message]")).to_have_count(0)
    assert page.input_value("#prompt") == "first line\nsecond line"
    page.press("#prompt", "Enter")
    expect(last_assistant(page)).to_have_attribute("data-state", "done")
    assert fake_state(fake)["last_chat"]["messages"][-1]["content"] == "first line\nsecond line"
    assert page.errors == []
