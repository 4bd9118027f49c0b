"""The bundled browser client (GET /) in a real headless Chromium against a real server.

Debian's ``chromium`` (``make browser-deps`` installs it) driven by Playwright for Python,
with no browser download. What the page sends is checked by decoding the WebSocket frames
Chromium reports; what it shows, through the data attributes the page keeps
(``body[data-conn]``, ``#status[data-state]``, ``#preview[data-step|data-previews]``) and
the canvas pixels. On failure a screenshot is saved and its path printed. The browser tests
skip only where /usr/bin/chromium is absent; the static-file test needs no browser.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest
from playwright.async_api import Browser, Page, WebSocket, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: `make browser-deps` installs Debian's chromium",
)


def _fetch(url: str, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` sent exactly as written (no client-side normalisation of ``..``)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    connection = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


async def test_static_assets_served_by_whitelist(start_server) -> None:
    async with start_server() as server:

        async def fetch(path: str) -> tuple[int, str, bytes]:
            return await asyncio.to_thread(_fetch, server.http_url, path)

        status, content_type, page = await fetch("/")
        assert (status, content_type) == (200, "text/html; charset=utf-8")
        assert b'src="app.js"' in page and b'href="app.css"' in page
        assert (await fetch("/index.html"))[2] == page
        status, content_type, script = await fetch("/app.js")
        assert (status, content_type) == (200, "text/javascript; charset=utf-8")
        assert b"latentToRgba" in script
        assert (await fetch("/app.css"))[:2] == (200, "text/css; charset=utf-8")
        for path in (
            "/nope.js",
            "/app.py",
            "/transport.py",
            "/../transport.py",
            "/static/app.js",
            "/%2e%2e/transport.py",
            "/..%2ftransport.py",
            "/.hidden.js",
            "/app.js/",
            "//app.js",
            "/a/../app.js",
            "/app.js%00.css",
        ):
            assert (await fetch(path))[0] == 404, path


class Frames:
    """Every MessagePack frame the page sent and received, decoded."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.urls: list[str] = []

    def attach(self, ws: WebSocket) -> None:
        self.urls.append(ws.url)
        ws.on("framesent", lambda payload: self._add(self.sent, payload))
        ws.on("framereceived", lambda payload: self._add(self.received, payload))

    @staticmethod
    def _add(into: list[dict[str, Any]], payload: str | bytes) -> None:
        assert isinstance(payload, bytes), f"a text frame: {payload!r}"
        into.append(msgpack.unpackb(payload))

    def submits(self) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame["type"] == "submit"]

    async def wait_for_submit(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first submit sent that matches ``predicate``, waiting for it if need be."""
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.submits():
                    if predicate(frame):
                        return frame
                await asyncio.sleep(0.02)

    def received_for(self, job_id: str, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("id") == job_id and m["type"] == kind]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def open_page(browser: Browser, url: str, frames: Frames) -> AsyncIterator[Page]:
    """A new page showing ``url``; a screenshot is kept if the body fails."""
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(30_000)
    log: list[str] = []
    page.on("console", lambda message: log.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: log.append(f"page error: {error}"))
    page.on("websocket", frames.attach)
    try:
        await page.goto(url)
        yield page
        errors = [line for line in log if line.startswith("page error")]
        assert not errors, errors
    except BaseException:
        shot = Path(tempfile.mkdtemp(prefix="latentcast-browser-")) / "failure.png"
        with suppress(Exception):
            await page.screenshot(path=str(shot), full_page=True)
        print(f"browser screenshot: {shot}")
        print("browser console:", *log, sep="\n  ")
        raise
    finally:
        await page.close()


@asynccontextmanager
async def connected_page(start_server, frames: Frames) -> AsyncIterator[Page]:
    """The page at the root of a fresh server, connected (welcome received)."""
    async with (
        start_server() as server,
        chromium() as browser,
        open_page(browser, server.http_url + "/", frames) as page,
    ):
        await page.wait_for_selector("body[data-conn=open]")
        yield page


# One read of what the page shows, taken inside the page so that it is consistent.
SNAPSHOT = """() => {
  const canvas = document.querySelector('#preview');
  const status = document.querySelector('#status');
  return {state: status.dataset.state, job: status.dataset.job || null,
          text: status.textContent, step: Number(canvas.dataset.step),
          previews: Number(canvas.dataset.previews), pixels: canvas.toDataURL()};
}"""


async def wait_for(page: Page, condition: str, arg: Any = None) -> dict[str, Any]:
    """The first snapshot ``s`` for which the JS expression ``condition`` holds (``a``: arg)."""
    handle = await page.wait_for_function(
        f"(a) => {{ const s = ({SNAPSHOT})(); return ({condition}) ? s : null; }}", arg=arg
    )
    snapshot: dict[str, Any] = await handle.json_value()
    return snapshot


async def set_fields(page: Page, **values: str) -> None:
    for name, value in values.items():
        await page.fill(f"#{name}", value)


@needs_chromium
async def test_previews_cancel_live_and_result(start_server) -> None:
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        welcome = frames.received[0]
        assert welcome["type"] == "welcome"
        options = await page.eval_on_selector_all("#scheduler option", "os => os.map(o => o.value)")
        assert options == welcome["model"]["schedulers"]

        # The page decodes latents exactly as PROTOCOL.md says (float16 edge cases included).
        await check_latent_decoding(page, welcome["model"]["latent_rgb"])

        # 1. Latent previews stream into the canvas, which changes before the job completes.
        await set_fields(page, prompt="a red fox", steps="40", width="128", height="128", seed="7")
        await page.select_option("#preview-kind", "latent")
        await page.click("#generate")
        first = await wait_for(page, "s.state === 'running' && s.previews >= 1")
        later = await wait_for(
            page, "s.state === 'running' && s.step > a.step && s.pixels !== a.pixels", first
        )
        assert later["previews"] > first["previews"]
        submit = frames.submits()[-1]
        assert submit["id"] == first["job"]
        assert submit["params"] == {
            "prompt": "a red fox",
            "steps": 40,
            "width": 128,
            "height": 128,
            "seed": 7,
            "guidance_scale": 7.5,
            "scheduler": welcome["defaults"]["scheduler"],
        }
        assert submit["preview"] == {"kind": "latent", "every": 1}
        assert "replaces" not in submit
        size = await page.eval_on_selector("#preview", "c => [c.width, c.height]")
        assert size == [128, 128]

        # 2. ... and ends with the final image, shown and downloadable as a PNG.
        done = await wait_for(page, "s.state === 'complete' && s.job === a", first["job"])
        assert done["text"].startswith("Done: 128×128, seed 7")
        await page.wait_for_selector("#result", state="visible")
        assert await page.eval_on_selector("#result", "i => i.naturalWidth") == 128
        assert await page.get_attribute("#download", "download") == "latentcast-7.png"
        head = await page.evaluate(
            """async () => {
              const response = await fetch(document.querySelector('#download').href);
              return Array.from(new Uint8Array(await response.arrayBuffer()).slice(0, 8));
            }"""
        )
        assert bytes(head) == b"\x89PNG\r\n\x1a\n"
        complete = frames.received_for(first["job"], "complete")[0]
        assert complete["images"][0]["data"][:8] == b"\x89PNG\r\n\x1a\n"

        # 3. Live mode: turning it on submits, typing submits again (debounced), and each
        # new job replaces the one before it.
        # 150 steps at 256x256: jobs that run until replaced, on any machine.
        await set_fields(page, steps="150", width="256", height="256", seed="")
        await page.check("#live")
        live = await wait_for(page, "s.state === 'running' && s.job !== a", first["job"])
        await page.click("#prompt")
        await page.keyboard.type(" in snow")
        last = await frames.wait_for_submit(lambda m: m["params"]["prompt"].endswith(" snow"))
        await wait_for(page, "s.state === 'running' && s.job === a", last["id"])
        chain = frames.submits()[1:]  # all but the first job's
        assert chain[0]["id"] == live["job"] and "replaces" not in chain[0]
        for before, after in itertools.pairwise(chain):
            assert after["replaces"] == before["id"]
            assert frames.received_for(before["id"], "cancelled")[0]["reason"] == "replaced"
        assert last["params"]["prompt"] == "a red fox in snow"

        # 4. Cancel stops the running job; the page shows it as cancelled.
        await page.uncheck("#live")
        await page.click("#cancel")
        cancelled = await wait_for(page, "s.state === 'cancelled'")
        assert cancelled["job"] == last["id"]
        assert frames.sent[-1] == {"type": "cancel", "id": last["id"]}
        assert frames.received_for(last["id"], "cancelled")[0]["reason"] == "client"
        assert await page.is_disabled("#cancel")


async def check_latent_decoding(page: Page, latent_rgb: dict[str, Any]) -> None:
    factors = np.array(latent_rgb["factors"], dtype=np.float64)
    bias = np.array(latent_rgb["bias"], dtype=np.float64)
    channels, height, width = factors.shape[0], 5, 7
    rng = np.random.default_rng(0)
    latent = rng.normal(0.0, 1.5, (channels, height, width)).astype("<f2")
    latent[0, 0, :4] = [np.inf, -np.inf, 6.0e-8, -0.0]  # infinities, a subnormal, -0
    data = latent.tobytes()

    decoded = await page.evaluate(
        """([shape, bytes, rgb]) =>
             Array.from(window.latentcast.latentToRgba(shape, new Uint8Array(bytes), rgb))""",
        [[channels, height, width], list(data), latent_rgb],
    )
    rgba = np.array(decoded, dtype=np.int64).reshape(height, width, 4)
    with np.errstate(invalid="ignore"):
        v = np.einsum("chw,ck->hwk", latent.astype(np.float64), factors) + bias
    expected = np.round((np.clip(np.nan_to_num(v, nan=-1.0), -1.0, 1.0) + 1) * 127.5)
    assert (rgba[..., 3] == 255).all()
    assert np.abs(rgba[..., :3] - expected).max() <= 1  # rounding of exact halves only
    bad = await page.evaluate(
        "rgb => window.latentcast.latentToRgba([4, 2, 2], new Uint8Array(3), rgb)", latent_rgb
    )
    assert bad is None


@needs_chromium
async def test_token_from_page_url(start_server) -> None:
    async with start_server(tokens=("s3cret",)) as server, chromium() as browser:
        frames = Frames()
        async with open_page(browser, server.http_url + "/?token=s3cret", frames) as page:
            await page.wait_for_selector("body[data-conn=open]")
            # The token, then the ask for a resumable session (PROTOCOL.md section 2a).
            assert frames.urls == [server.ws_url + "?token=s3cret&resumable=1"]
            assert frames.received[0]["type"] == "welcome"
            assert await page.is_enabled("#generate")

        frames = Frames()
        async with open_page(browser, server.http_url + "/", frames) as page:
            # Refused (401): the page asks /ready why, and then points at ?token=.
            await page.wait_for_function(
                "document.body.dataset.conn === 'closed'"
                " && document.querySelector('#conn-text').textContent.includes('?token=')"
            )
            assert await page.is_disabled("#generate")
            assert frames.received == []


# Issue 7, item 3: the page's layout, cancel, replace and ready status.

OLD_IDLE_TEXT = "Ready when the server is."


@needs_chromium
async def test_status_says_ready_once_welcomed(start_server) -> None:
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        model = frames.received[0]["model"]
        status = await page.wait_for_function(
            "document.querySelector('#status').textContent.startsWith('Ready')"
        )
        assert await status.json_value()
        text = await page.text_content("#status")
        assert text != OLD_IDLE_TEXT
        assert text is not None and f"Ready: {model['name']} ({model['family']})" in text
        assert await page.get_attribute("#status", "data-state") == "idle"


# Every mouse event on the page, with the id (or tag) of its target, in order.
RECORD_MOUSE = """() => {
  window.mouseEvents = [];
  for (const type of ['mousedown', 'mouseup', 'click', 'change']) {
    document.addEventListener(type, (e) => window.mouseEvents.push(
      `${type}:${e.target.id || e.target.tagName}`), true);
  }
}"""

BOX = "e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }"


async def type_into(page: Page, selector: str, text: str) -> None:
    """Focus ``selector`` and replace its value by typing, as a person would."""
    await page.focus(selector)
    await page.keyboard.press("Control+A")
    await page.keyboard.type(text)


@needs_chromium
async def test_generate_click_right_after_editing_the_size(start_server) -> None:
    # The size fields' change event fires on the mousedown of the Generate click (the field
    # loses focus) and reshapes the sketch; nothing may move under the pointer then.
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        await set_fields(page, steps="3", seed="5")
        # A square size first (committed by Tab), then a tall one left in the focused field:
        # the old page's sketch grew taller and pushed Generate down under the pointer.
        await type_into(page, "#height", "128")
        await page.keyboard.press("Tab")
        await type_into(page, "#width", "128")
        await page.keyboard.press("Tab")  # change:width; the focus moves on to #height
        assert await page.evaluate("document.activeElement.id") == "height"
        await page.keyboard.press("Control+A")
        await page.keyboard.type("256")
        assert await page.eval_on_selector("#sketch", "c => [c.width, c.height]") == [256, 256]

        await page.evaluate(RECORD_MOUSE)
        x, y, width, height = await page.eval_on_selector("#generate", BOX)
        assert y + height <= 860, "Generate must be in the viewport"
        await page.mouse.move(x + width / 2, y + height / 2)
        await page.mouse.down()  # blurs #height: change:height resizes the sketch
        await page.mouse.up()

        events = await page.evaluate("window.mouseEvents")
        assert events == [
            "mousedown:generate",
            "change:height",
            "mouseup:generate",
            "click:generate",
        ]
        submit = await frames.wait_for_submit(lambda m: True, timeout=5)
        assert (submit["params"]["width"], submit["params"]["height"]) == (128, 256)
        await wait_for(page, "s.state === 'complete' && s.job === a", submit["id"])
        # The sketch followed the new aspect inside its box, and the button did not move.
        assert await page.eval_on_selector("#sketch", "c => [c.width, c.height]") == [128, 256]
        assert await page.eval_on_selector("#generate", BOX) == [x, y, width, height]
        _, _, sketch_w, sketch_h = await page.eval_on_selector("#sketch", BOX)
        assert abs(sketch_w / sketch_h - 0.5) < 0.05


STAGE = """() => {
  const note = document.querySelector('#stage-note');
  const preview = getComputedStyle(document.querySelector('#preview'));
  return {note: note && !note.hidden && note.offsetParent !== null ? note.textContent : null,
          opacity: Number(preview.opacity), visible: preview.visibility !== 'hidden'};
}"""


@needs_chromium
async def test_cancel_marks_the_preview_left_on_the_stage(start_server) -> None:
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        await set_fields(page, prompt="a fox", steps="150", width="256", height="256")
        await page.select_option("#preview-kind", "latent")
        await page.click("#generate")
        await wait_for(page, "s.state === 'running' && s.previews >= 1")
        running = await page.evaluate(STAGE)
        assert running == {"note": None, "opacity": 1, "visible": True}

        await page.click("#cancel")
        cancelled = await wait_for(page, "s.state === 'cancelled'")
        stage = await page.evaluate(STAGE)
        # The preview stays visible but dimmed, labelled with the step it stopped at.
        assert stage["note"] is not None and stage["note"].startswith("Cancelled at step ")
        assert stage["note"].endswith("/150")
        assert stage["visible"] and stage["opacity"] < 0.5
        assert "stale" in (await page.get_attribute("#stage", "class") or "").split()
        assert cancelled["previews"] >= 1

        # The next job's first preview clears the mark.
        await page.click("#generate")
        next_job = "s.state === 'running' && s.job !== a && s.previews >= 1"
        await wait_for(page, next_job, cancelled["job"])
        assert await page.evaluate(STAGE) == {"note": None, "opacity": 1, "visible": True}
        await page.click("#cancel")
        await wait_for(page, "s.state === 'cancelled'")


@needs_chromium
async def test_generate_while_a_job_runs_says_it_replaces(start_server) -> None:
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        assert await page.text_content("#generate") == "Generate"
        await set_fields(page, prompt="a fox", steps="150", width="256", height="256")
        await page.click("#generate")
        first = await wait_for(page, "s.state === 'running'")
        # While a job runs, the button says what pressing it does.
        assert await page.text_content("#generate") == "Replace"

        await set_fields(page, seed="11")
        await page.click("#generate")
        second = await frames.wait_for_submit(lambda m: m["id"] != first["job"])
        assert second["replaces"] == first["job"]
        noted = "s.job === a && s.state === 'running' && s.text.includes('replaced')"
        replaced = await wait_for(page, noted, second["id"])
        assert replaced["text"].endswith(" · replaced the running job")
        assert frames.received_for(first["job"], "cancelled")[0]["reason"] == "replaced"
        assert await page.text_content("#generate") == "Replace"
        # Once nothing runs any more, it is Generate again.
        await page.click("#cancel")
        await wait_for(page, "s.job === a && s.state === 'cancelled'", second["id"])
        assert await page.text_content("#generate") == "Generate"


@needs_chromium
async def test_a_reloaded_page_resumes_its_session_and_gets_its_job(start_server) -> None:
    """PROTOCOL.md 2a with the browser page: a reload mid-job takes the session over
    (the token kept in sessionStorage) and the job's result still arrives."""
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        first_welcome = frames.received[0]
        assert isinstance(first_welcome["resume_token"], str)
        await set_fields(page, prompt="a red fox", steps="40", width="128", height="128")
        await page.select_option("#preview-kind", "latent")
        await page.click("#generate")
        running = await wait_for(page, "s.state === 'running' && s.previews >= 1")
        await page.reload()
        await page.wait_for_selector("body[data-conn=open]")
        welcomes = [m for m in frames.received if m["type"] == "welcome"]
        assert len(welcomes) == 2
        assert welcomes[1]["resumed"] is True
        assert welcomes[1]["session"] == first_welcome["session"]
        assert "resume=" in frames.urls[1] and "after=0" in frames.urls[1]
        done = await wait_for(page, "s.state === 'complete' && s.job === a", running["job"])
        assert done["text"].startswith("Done: 128×128")
        # (A complete that came before the reload comes again: the page resumes after 0.)
        assert frames.received_for(running["job"], "complete")


@needs_chromium
async def test_the_model_selector_sends_the_chosen_model(start_server) -> None:
    """Feature "models": the page offers every model and its job runs on the chosen one,
    with that model's schedulers; a server of one model hides the selector."""
    frames = Frames()
    async with (
        start_server(model=("sd=tiny", "xl=tiny-sdxl"), max_resident_models=1) as server,
        chromium() as browser,
        open_page(browser, server.http_url + "/", frames) as page,
    ):
        await page.wait_for_selector("body[data-conn=open]")
        assert await page.is_visible("#model-field")
        options = await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert options == ["sd", "xl"]
        await page.select_option("#model", "xl")
        await set_fields(page, prompt="a red fox", steps="2", seed="3")
        await page.click("#generate")
        submit = await frames.wait_for_submit(lambda frame: True)
        assert submit["params"]["model"] == "xl"
        done = await wait_for(page, "s.state === 'complete' && s.job === a", submit["id"])
        assert done["text"].startswith("Done: 64×64, seed 3")
        loading = [m for m in frames.received_for(submit["id"], "queued") if m.get("loading")]
        assert loading, "xl was not loaded: its job waited for the load"
    frames = Frames()
    async with connected_page(start_server, frames) as page:
        assert not await page.is_visible("#model-field")
