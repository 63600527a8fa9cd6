"""Open a local HTML file in Debian's headless Chromium with the network blocked, and report what
each chart container drew, the console errors, and every request that tried to leave the disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SKIP_REASON = "Debian chromium is not installed (apt-get install -y chromium; .ci/run installs it)"

# The machine notes' flags: without the background-networking ones Chromium keeps dialling out.
# The resolver and proxy rules make any http(s) fetch fail at once instead of reaching a CDN.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
]

# Records uncaught errors where the page itself can see them, so waiting can stop early on a
# page that will never draw (a CDN script that did not load leaves vegaEmbed undefined).
INIT_SCRIPT = "window.__errors = []; addEventListener('error', (e) => window.__errors.push(String(e.message)));"

# For each container: the size of its SVG and how many drawn marks it holds, or how many canvas
# pixels are not transparent, and the text of its SVG labels.
PROBE = """(selector) => [...document.querySelectorAll(selector)].map((element) => {
  const svg = element.querySelector('svg');
  const canvas = element.querySelector('canvas');
  let ink = 0;
  if (canvas && canvas.width && canvas.height) {
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) ink++;
  }
  const box = svg ? svg.getBoundingClientRect() : null;
  return {
    id: element.id,
    rendered: element.dataset.rendered === 'true',
    svg_width: box ? box.width : 0,
    svg_height: box ? box.height : 0,
    symbols: svg ? svg.querySelectorAll('.mark-symbol.role-mark path').length : 0,
    bars: svg ? svg.querySelectorAll('.mark-rect.role-mark path').length : 0,
    lines: svg ? svg.querySelectorAll('.mark-line.role-mark path').length : 0,
    texts: svg ? [...svg.querySelectorAll('.mark-text.role-mark text')].map((t) => t.textContent) : [],
    canvas_ink: ink,
  };
})"""

SETTLED = """(selector) => window.__errors.length > 0 || [...document.querySelectorAll(selector)].every(
  (e) => e.dataset.rendered || e.dataset.error || e.querySelector('svg .marks, svg g, canvas'))"""


@dataclass
class Page:
    containers: list[dict]
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)

    def by_id(self) -> dict[str, dict]:
        return {container["id"]: container for container in self.containers}


def drawn(container: dict) -> bool:
    return (container["svg_width"] > 0 and container["svg_height"] > 0 and
            container["symbols"] + container["bars"] + container["lines"] > 0) or container["canvas_ink"] > 0


def open_page(path: Path, selector: str, timeout_ms: int = 60_000) -> Page:
    """Load ``path`` and wait until every ``selector`` container has drawn or failed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, chromium_sandbox=False)
        try:
            page = browser.new_page()
            result = Page(containers=[])
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: result.page_errors.append(str(error)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:"))
                    else result.outside_requests.append(r.url))
            page.add_init_script(INIT_SCRIPT)
            page.goto(path.resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            try:
                page.wait_for_function(SETTLED, arg=selector, timeout=timeout_ms)
            except PlaywrightTimeout:
                pass  # what did draw is still reported; the caller's assertions say what is missing
            result.containers = page.evaluate(PROBE, selector)
            return result
        finally:
            browser.close()
