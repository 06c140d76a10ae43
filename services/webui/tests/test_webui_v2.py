"""Web UI v2 in a real browser against the fake upstream: chat (sampling settings, a system prompt
per chat, tokens/s, branches ‹ 1/2 ›, copy buttons, highlighted code, dark mode, shortcuts,
search, export and import), a pipeline job's steps, eval scores and folded event lines, aliases
edited on the models page; and an axe-core check of every page (no serious or critical
violation) with no console error or failed request (the favicon's 404 before). One browser
context for the module."""

import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, CHAT_TOKEN, OUTPUT
from playwright.sync_api import Page, expect
from test_webui_browser import DESKTOP, fake_state, last_assistant, send

pytestmark = pytest.mark.slow

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
PAGES = ["#/chat", "#/jobs", "#/jobs/job-speedrun", "#/jobs/job-report", "#/launch", "#/models"]


def open_watched(browser, url: str, **options) -> Page:
    """A signed-in page that records page errors, console errors and failed requests."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True, **options)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    assert context.request.post(f"{url}/api/session", data={"token": CHAT_TOKEN}).ok
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda exc: page.problems.append(f"pageerror {exc}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console {m.text}"))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(f"{r.status} {r.url}"))
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page


@pytest.fixture(scope="module")
def page(browser, webui):
    page = open_watched(browser, webui.url)
    yield page
    page.context.close()


def settle(page: Page) -> None:
    expect(last_assistant(page)).to_have_attribute("data-state", "done")


def test_settings_system_prompt_stats_and_branches(page, fake):
    page.get_by_test_id("settings").locator("summary").click()
    expect(page.locator("[data-setting=temperature]")).to_have_value("0.8")
    expect(page.locator("[data-setting=top_k]")).to_have_value("50")
    page.fill("[data-setting=temperature]", "0.5")
    page.locator("[data-setting=temperature]").dispatch_event("change")
    page.fill("[data-setting=system]", "You are terse.")
    page.locator("[data-setting=system]").dispatch_event("change")
    send(page, "hello branches")
    settle(page)
    sent = fake_state(fake)["last_chat"]
    assert (sent["temperature"], sent["top_k"]) == (0.5, 50)
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    # The fake sends usage as inference does: its completion_tokens is the count shown.
    expect(last_assistant(page).get_by_test_id("stats")).to_have_text(re.compile(r"^\d+ tokens · [\d.,K]+ tok/s$"))

    first = last_assistant(page).locator(".body").inner_text()
    page.get_by_test_id("regenerate").click()
    settle(page)
    expect(last_assistant(page).get_by_test_id("branch-count")).to_have_text("2/2")
    second = last_assistant(page).locator(".body").inner_text()
    assert second != first
    last_assistant(page).get_by_test_id("branch-prev").click()
    expect(last_assistant(page).get_by_test_id("branch-count")).to_have_text("1/2")
    expect(last_assistant(page).locator(".body")).to_have_text(first)

    user = page.locator("[data-testid=message][data-role=user]").first
    user.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("an edited question")
    page.get_by_test_id("edit-save").click()
    settle(page)
    user = page.locator("[data-testid=message][data-role=user]").first
    expect(user.get_by_test_id("branch-count")).to_have_text("2/2")
    user.get_by_test_id("branch-prev").click()
    # The old question comes back with the answer last looked at under it.
    expect(user.locator(".body")).to_have_text("hello branches")
    expect(last_assistant(page).locator(".body")).to_have_text(first)
    expect(last_assistant(page).get_by_test_id("branch-count")).to_have_text("1/2")
    page.get_by_test_id("settings").locator("summary").click()
    page.screenshot(path=OUTPUT / "chat-branches-desktop.png")

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("[data-setting=temperature]")).to_have_value("0.5")
    expect(page.locator("[data-setting=system]")).to_have_value("You are terse.")
    expect(page.locator("[data-testid=message][data-role=user]").first.get_by_test_id("branch-count")).to_have_text(
        "1/2"
    )
    last_assistant(page).get_by_test_id("copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()").strip() == first.strip()


def test_code_is_highlighted_dark_mode_and_shortcuts(page, fake):
    page.keyboard.press("Control+Shift+O")
    expect(page.locator("[data-testid=message]")).to_have_count(0)
    expect(page.get_by_test_id("conversation")).to_have_count(2)
    expect(page.locator("[data-setting=system]")).to_have_value("")
    send(page, "some code please")
    settle(page)
    assert fake_state(fake)["last_chat"]["messages"][0]["role"] == "user"
    code = last_assistant(page).locator(".codeblock code")
    expect(code).to_have_text("print('hello')")
    expect(code.locator("span.hljs-built_in")).to_have_text("print")

    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    page.get_by_test_id("theme-toggle").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.screenshot(path=OUTPUT / "chat-dark-desktop.png")
    page.get_by_test_id("theme-toggle").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "light")

    send(page, "tell me a slow story")
    expect(last_assistant(page)).to_have_attribute("data-state", "streaming")
    expect(last_assistant(page).locator(".body")).to_contain_text("word3")
    page.locator("body").click(position={"x": 5, "y": 400})
    page.keyboard.press("Escape")
    expect(last_assistant(page)).to_have_attribute("data-state", "stopped")
    page.keyboard.press("Shift+Escape")
    expect(page.locator("#prompt")).to_be_focused()
    page.get_by_test_id("shortcuts").locator("summary").click()
    expect(page.get_by_test_id("shortcuts")).to_contain_text("Ctrl+Shift+O")

    page.get_by_test_id("chat-search").fill("BRANCHES")
    expect(page.get_by_test_id("conversation")).to_have_count(1)
    expect(page.get_by_test_id("conversation")).to_contain_text("hello branches")
    page.get_by_test_id("chat-search").fill("")
    expect(page.get_by_test_id("conversation")).to_have_count(2)


def test_export_and_import_chats(page, browser, webui, tmp_path):
    with page.expect_download() as got:
        page.get_by_test_id("export-json").click()
    exported = tmp_path / "chats.json"
    got.value.save_as(exported)
    body = json.loads(exported.read_text())
    assert body["format"] == "nanochat.chats.v1" and len(body["conversations"]) == 2
    with page.expect_download() as got:
        page.get_by_test_id("export-markdown").click()
    markdown = Path(got.value.path()).read_text()
    assert markdown.startswith("# some code please") and "## Assistant" in markdown and "print('hello')" in markdown

    # Imported into the same browser the chats come in as copies; a bad file is a clear error.
    page.get_by_test_id("import-file").set_input_files(str(exported))
    expect(page.get_by_test_id("conversation")).to_have_count(4)
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"messages": [{"role": "user"}]}]}')
    page.get_by_test_id("import-file").set_input_files(str(bad))
    expect(page.get_by_test_id("chat-error")).to_contain_text("Import failed: Conversation 1 in the file is malformed.")
    expect(page.get_by_test_id("conversation")).to_have_count(4)


def test_pipeline_job_steps_evals_and_event_lines(page, webui):
    page.goto(f"{webui.url}/#/jobs/job-speedrun")
    steps = page.get_by_test_id("step")
    expect(steps).to_have_count(7)
    expect(steps.nth(3)).to_have_attribute("data-state", "succeeded")
    expect(steps.nth(3).get_by_test_id("step-version")).to_have_text("nanochat v2 (base)")
    expect(steps.nth(1).get_by_test_id("step-version")).to_have_text("nanochat v1 (tokenizer)")
    expect(steps.nth(4)).to_have_attribute("data-state", "running")
    expect(steps.nth(5)).to_have_attribute("data-state", "pending")
    expect(page.get_by_test_id("chart-val_bpb")).to_have_attribute("data-points", "2")
    expect(page.get_by_test_id("eval-core")).to_have_text("0.11 (step 5)")
    log = page.get_by_test_id("log")
    expect(log).to_contain_text("validation bpb 1.0500")
    assert log.inner_text().splitlines() == ["starting base_train", "step 00005 loss 3.2000", "validation bpb 1.0500"]
    page.screenshot(path=OUTPUT / "dashboard-pipeline-desktop.png", full_page=True)
    page.get_by_test_id("show-events").check()
    expect(log).to_contain_text('"type": "progress"')
    assert len(log.inner_text().splitlines()) == 5


def test_aliases_are_edited_when_signed_in(page, webui):
    page.goto(f"{webui.url}/#/models")
    row = page.locator("[data-testid=version-row][data-version='3']")
    expect(row.get_by_test_id("alias-add")).to_have_count(0)
    assert page.context.request.post(f"{webui.url}/api/session", data={"token": ADMIN_TOKEN}).ok
    page.reload()
    expect(page.locator("#login-button")).to_have_text("Sign out (admin)")
    # The serving version's lineage names the job that registered its ancestors.
    expect(page.get_by_test_id("lineage-job")).to_have_count(2)
    expect(page.get_by_test_id("lineage-job").first).to_have_attribute("href", "#/jobs/job-speedrun")
    row.get_by_test_id("alias-add").click()
    row.get_by_test_id("alias-input").fill("candidate")
    row.get_by_test_id("alias-input").press("Enter")
    expect(row.get_by_test_id("alias")).to_have_text("candidate")
    page.screenshot(path=OUTPUT / "dashboard-models-aliases-desktop.png", full_page=True)
    row.get_by_role("button", name="Remove alias candidate").click()
    expect(row.get_by_test_id("alias")).to_have_count(0)
    assert page.context.request.post(f"{webui.url}/api/session", data={"token": CHAT_TOKEN}).ok


def series_of(chart) -> list[tuple[str, int, str, str]]:
    """Each series drawn on a chart: its label, point count, first and last `step,value`."""
    paths = chart.get_by_test_id("series")
    return [
        tuple(paths.nth(i).get_attribute(k) for k in ("data-label", "data-points", "data-first", "data-last"))
        for i in range(paths.count())
    ]


def test_two_jobs_loss_curves_on_one_chart(page, webui):
    page.goto(f"{webui.url}/#/jobs")
    compare = page.get_by_test_id("compare")
    expect(compare.get_by_test_id("compare-note")).to_contain_text("Tick two or more jobs")
    for job in ("job-speedrun", "job-report"):
        page.locator(f"[data-testid=job-row][data-job={job}]").get_by_test_id("compare-pick").check()
    loss, bpb = compare.get_by_test_id("chart-loss"), compare.get_by_test_id("chart-val_bpb")
    expect(loss).to_have_attribute("data-series", "2")
    expect(bpb).to_have_attribute("data-series", "2")
    # The fake trainer's curves, point for point: one labelled series per job.
    assert [(label.split()[0], n, first, last) for label, n, first, last in series_of(loss)] == [
        ("job-speedrun", "5", "1,9", "5,3.2"),
        ("job-report", "6", "1,8.5", "6,2.9"),
    ]
    assert [(label.split()[0], n, first, last) for label, n, first, last in series_of(bpb)] == [
        ("job-speedrun", "2", "2,1.4", "5,1.05"),
        ("job-report", "2", "3,1.2", "6,0.98"),
    ]
    expect(loss.get_by_test_id("legend-item")).to_have_text(
        [
            "job-speedrun speedrun pipeline (tiny) · base_train · 3.2",
            "job-report speedrun pipeline (tiny) · base_train · 2.9",
        ]
    )
    expect(compare.get_by_test_id("compare-note")).to_have_text("")
    # Ticks survive the list's repaint (its rows are drawn anew); unticking one leaves its series off.
    page.locator("[data-job=job-report]").get_by_test_id("compare-pick").evaluate("el => { el.dataset.old = '1'; }")
    expect(page.locator("[data-job=job-report] [data-testid=compare-pick]:not([data-old])")).to_be_checked()
    page.screenshot(path=OUTPUT / "dashboard-compare-desktop.png", full_page=True)
    page.locator("[data-testid=job-row][data-job=job-speedrun]").get_by_test_id("compare-pick").uncheck()
    expect(loss).to_have_attribute("data-series", "1")
    assert series_of(loss)[0][0].startswith("job-report")
    page.locator("[data-testid=job-row][data-job=job-report]").get_by_test_id("compare-pick").uncheck()


def test_job_page_renders_its_report_card_without_its_html(page, webui):
    page.goto(f"{webui.url}/#/jobs/job-report")
    card = page.get_by_test_id("job-report")
    expect(card.locator("h3").first).to_have_text("Report card · nanochat v5")
    expect(card.locator("h3").nth(1)).to_have_text("nanochat training report")
    expect(card.locator("td")).to_contain_text(["base", "1.21", ""])
    # The card's tags come out as text: nothing in it becomes an element, nothing runs.
    expect(card).to_contain_text('<script>window.__xss=5</script> <img src=x onerror="window.__xss=6">')
    assert card.locator("script, img[src=x], iframe").count() == 0
    # Its plot, an attachment beside it, is drawn (from a blob of its type); an outside URL is text.
    plot = card.get_by_test_id("report-image")
    expect(plot).to_have_count(1)
    expect(plot).to_have_attribute("data-file", "loss.svg")
    expect(plot).to_have_attribute("alt", "training loss")
    page.wait_for_function("() => document.querySelector('[data-testid=report-image]').naturalWidth === 200")
    expect(card).to_contain_text("![elsewhere](https://example.com/x.png)")
    assert page.evaluate("[window.__xss, window.parent.__xss]") == [None, None]
    plot.scroll_into_view_if_needed()
    page.screenshot(path=OUTPUT / "dashboard-report-desktop.png")
    # A job with no report step has no card.
    page.goto(f"{webui.url}/#/jobs/job-speedrun")
    expect(page.get_by_test_id("steps")).to_be_visible()
    expect(page.get_by_test_id("job-report")).to_be_hidden()


def test_chat_with_a_pinned_version_or_an_alias(page, webui, fake):
    serving = httpx.get(f"{fake.url}/registry/v1/models").json()["items"][0]["aliases"]["serving"]
    served = httpx.get(f"{fake.url}/inference/v1/models").json()["data"][0]["version"]
    page.goto(f"{webui.url}/#/chat")
    page.keyboard.press("Control+Shift+O")
    picker = page.get_by_test_id("chat-version")
    expect(picker.locator("option")).to_have_text(
        [
            "nanochat · served version",
            f"nanochat@serving (now v{serving})",
            "nanochat:5 · rl",
            "nanochat:4 · sft",
            "nanochat:3 · mid",
            "nanochat:2 · base",
        ]
    )
    picker.select_option("nanochat:3")
    send(page, "which one are you")
    settle(page)
    assert fake_state(fake)["last_chat"]["model"] == "nanochat:3"
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text("nanochat:3")
    picker.select_option("nanochat@serving")
    page.get_by_test_id("regenerate").click()
    settle(page)
    assert fake_state(fake)["last_chat"]["model"] == "nanochat@serving"
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text(f"nanochat:{serving}")
    # The chat keeps its pick across a reload; a new chat talks to the served version.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_test_id("chat-version")).to_have_value("nanochat@serving")
    page.keyboard.press("Control+Shift+O")
    expect(page.get_by_test_id("chat-version")).to_have_value("")
    send(page, "and you")
    settle(page)
    assert fake_state(fake)["last_chat"]["model"] == "nanochat"
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text(f"nanochat:{served}")

    # "Chat" on the models page opens a new chat pinned to that version.
    page.goto(f"{webui.url}/#/models")
    page.locator("[data-testid=version-row][data-version='2']").get_by_test_id("chat-version-link").click()
    expect(page).to_have_url(f"{webui.url}/#/chat")
    expect(page.get_by_test_id("chat-version")).to_have_value("nanochat:2")
    expect(page.locator(".empty")).to_contain_text("This chat talks to nanochat:2.")
    send(page, "hello base")
    settle(page)
    assert fake_state(fake)["last_chat"]["model"] == "nanochat:2"
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text("nanochat:2")
    page.screenshot(path=OUTPUT / "chat-pinned-desktop.png")


def test_every_page_passes_axe_with_no_console_error(page, browser, webui):
    assert page.problems == []
    # axe goes in as a script tag, which the UI's CSP (script-src 'self') rightly refuses.
    checked = open_watched(browser, webui.url, bypass_csp=True)
    try:
        # Every page in the light theme; the dark one where its colours matter most.
        for theme, pages in [("light", PAGES), ("dark", ["#/chat", "#/models"])]:
            checked.evaluate("(t) => localStorage.setItem('nanochat.theme', t)", theme)
            for hash_ in pages:
                checked.goto(f"{webui.url}/{hash_}")
                checked.reload()
                expect(checked.locator("body")).to_have_attribute("data-ready", "true")
                expect(checked.locator("main h2, main .empty").first).to_be_visible()
                checked.add_script_tag(path=str(AXE))
                violations = checked.evaluate("async () => (await axe.run(document)).violations")
                bad = [
                    (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
                    for v in violations
                    if v["impact"] in ("serious", "critical")
                ]
                assert bad == [], f"{theme} {hash_}: {bad}"
        assert checked.problems == []
    finally:
        checked.context.close()
