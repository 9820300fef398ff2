"""Full-page screenshots of the built docs, as a reader opening them from disk sees them.

Usage: ``python docs/screenshots.py [HTML_DIR] [OUT_DIR] [--width 1280 ...]`` (``make
docs-shots`` builds the docs first). Headless Chromium (``/usr/bin/chromium``, or
``$CHROMIUM``) opens every page from ``file://`` with every host name unresolvable, waits
for MathJax, and writes ``OUT_DIR/<page>.png`` (``<page>-<width>.png`` for each width
after the first). For each page it also reports, and exits 1 on, what a reader would see
broken: a request to the network, maths left as LaTeX source, and a table, equation or
code listing wider than the column (cut off, or hidden behind a scroll bar). Takes about a second a page.

Chromium is driven through its DevTools protocol on a pipe (``--remote-debugging-pipe``),
so this needs nothing but the Python standard library and the browser.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Generated pages with nothing of the docs' own on them.
SKIPPED = {"genindex.html", "search.html", "py-modindex.html"}
FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  # Offline, as the docs must work: no host name resolves.
  "--host-resolver-rules=MAP * ~NOTFOUND",
  "--remote-debugging-pipe",
]

# Runs in the page once it has loaded: waits for MathJax and the fonts, then measures.
INSPECT = """(async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  await document.fonts.ready;
  const article = document.querySelector("article") || document.body;
  const right = article.getBoundingClientRect().right;
  const name = (el) => {
    const id = el.closest("[id]");
    return el.tagName.toLowerCase() + (id ? " in #" + id.id : "") + ": " + el.textContent.trim().slice(0, 40);
  };
  const wide = [];
  for (const el of article.querySelectorAll("table, .math, mjx-container, img, pre")) {
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    const scrolls = el.scrollWidth > el.clientWidth + 1 && style.overflowX !== "visible";
    let hidden = false;  // clipped or scrolled by a wrapper
    for (let up = el.parentElement; up && up !== article; up = up.parentElement) {
      if (up.scrollWidth > up.clientWidth + 1 && getComputedStyle(up).overflowX !== "visible") {
        hidden = true;
      }
    }
    // Furo lets a table's shadow stand a few pixels out of the column: that is not cut off.
    if (box.right > right + 8 || scrolls || hidden) wide.push(name(el));
  }
  const raw = [...article.querySelectorAll(".math")]
    .filter((el) => !el.querySelector("mjx-container") && /\\\\[a-zA-Z]/.test(el.textContent))
    .map((el) => el.textContent.slice(0, 60));
  return {
    height: Math.ceil(document.documentElement.scrollHeight),
    wide: [...new Set(wide)],
    raw,
    mathjax: !!(window.MathJax && MathJax.version),
  };
})()"""


class Browser:
  """One headless Chromium, spoken to in DevTools protocol messages, each ended by NUL."""

  def __init__(self, binary: str, width: int):
    self.profile = tempfile.TemporaryDirectory()
    flags = [*FLAGS, f"--user-data-dir={self.profile.name}", f"--window-size={width},800"]
    # Chromium reads commands on fd 3 and writes replies on fd 4: the shell moves the
    # pipes there.
    self.process = subprocess.Popen(
      ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null 2>&1', binary, *flags],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
    )
    self.ids = itertools.count(1)
    self.buffer = b""
    self.events: list[dict] = []
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Network", "Runtime"):
      self.call(f"{domain}.enable", session=True)

  def _read(self) -> dict:
    while b"\0" not in self.buffer:
      chunk = os.read(self.process.stdout.fileno(), 1 << 20)
      if not chunk:
        raise RuntimeError("Chromium closed the DevTools pipe")
      self.buffer += chunk
    message, self.buffer = self.buffer.split(b"\0", 1)
    return json.loads(message)

  def call(self, method: str, session: bool = False, **params) -> dict:
    message = {"id": next(self.ids), "method": method, "params": params}
    if session:
      message["sessionId"] = self.session
    self.process.stdin.write(json.dumps(message).encode() + b"\0")
    self.process.stdin.flush()
    while True:
      reply = self._read()
      if reply.get("id") == message["id"]:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]
      self.events.append(reply)

  def wait_for(self, event: str) -> None:
    while not any(e.get("method") == event for e in self.events):
      self.events.append(self._read())

  def shoot(self, url: str, width: int, out: Path) -> dict:
    """Loads ``url`` in a window ``width`` wide, and saves the whole page as a PNG."""
    self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=800,
              deviceScaleFactor=1, mobile=False)  # fmt: skip
    self.events.clear()
    self.call("Page.navigate", session=True, url=url)
    self.wait_for("Page.loadEventFired")
    result = self.call(
      "Runtime.evaluate", session=True, expression=INSPECT, awaitPromise=True, returnByValue=True
    )
    if "exceptionDetails" in result:
      raise RuntimeError(f"{url}: {result['exceptionDetails']}")
    found = result["result"]["value"]
    found["requests"] = sorted(
      {
        e["params"]["request"]["url"]
        for e in self.events
        if e.get("method") == "Network.requestWillBeSent"
        and e["params"]["request"]["url"].startswith(("http:", "https:"))
      }
    )
    # The whole page: a window as tall as the page, then one screenshot of it.
    self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
              height=found["height"], deviceScaleFactor=1, mobile=False)  # fmt: skip
    png = self.call("Page.captureScreenshot", session=True, format="png")["data"]
    out.write_bytes(base64.b64decode(png))
    return found

  def close(self) -> None:
    with contextlib.suppress(RuntimeError):  # It may close the pipe before it answers.
      self.call("Browser.close")
    self.process.wait(timeout=30)
    self.profile.cleanup()


def pages(html: Path) -> list[Path]:
  """Every page of the docs: not the generated indexes, nothing under ``_static`` and such."""
  return sorted(
    page
    for page in html.rglob("*.html")
    if page.name not in SKIPPED
    and not any(part.startswith("_") for part in page.relative_to(html).parts)
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html", nargs="?", type=Path, default=DOCS / "_build" / "html")
  parser.add_argument("out", nargs="?", type=Path, default=DOCS / "_build" / "shots")
  parser.add_argument("--width", type=int, action="append", help="window width (repeatable)")
  parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
  args = parser.parse_args(argv)
  if not shutil.which(args.chromium):
    parser.error(f"no browser at {args.chromium}: apt-get install chromium, or set $CHROMIUM")
  widths = args.width or [1280]
  args.out.mkdir(parents=True, exist_ok=True)
  problems = 0
  for number, width in enumerate(widths):
    browser = Browser(args.chromium, width)
    try:
      for page in pages(args.html):
        name = page.relative_to(args.html).with_suffix("").as_posix().replace("/", "_")
        out = args.out / (f"{name}.png" if number == 0 else f"{name}-{width}.png")
        found = browser.shoot(page.resolve().as_uri(), width, out)
        notes = [f"{k}: {found[k][:3]}" for k in ("requests", "raw", "wide") if found[k]]
        problems += bool(notes)
        print(f"{out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}: "
              f"{width}x{found['height']}", *notes or ["ok"], sep="  ")  # fmt: skip
    finally:
      browser.close()
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
