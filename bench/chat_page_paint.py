"""How fast the chat page paints on a slow machine: the ui service alone on loopback, the page
opened in headless Chromium with its CPU slowed down (``--cpu-slowdown``, 4x by default) and a
slow network (``--down-kbps``, 1,600 kbit/s, and ``--rtt-ms``, 150 ms, about a slow 4G phone),
first with an empty cache, then reloaded with it warm. Prints first contentful paint, the end of
DOMContentLoaded (every module, libraries included, loaded and run) and the bytes transferred.
Figures are printed, never asserted. Run: ``.venv/bin/python -m bench.chat_page_paint``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench.common import load_average, machine_description
from deploy.local_stack import pick_free_port, ui_process

CHROMIUM = "/usr/bin/chromium"  # Debian's (docs/testing.md): Playwright never downloads a browser here
TIMINGS = """() => {
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  const nav = performance.getEntriesByType("navigation")[0];
  const bytes = performance.getEntriesByType("resource").reduce((n, r) => n + r.transferSize, nav.transferSize);
  return {fcp: paint ? paint.startTime : null, dcl: nav.domContentLoadedEventEnd, bytes};
}"""


def measure(url: str, slowdown: float, down_kbps: int, rtt_ms: int) -> list[dict]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        cdp = page.context.new_cdp_session(page)
        cdp.send("Emulation.setCPUThrottlingRate", {"rate": slowdown})
        throughput = down_kbps * 1000 / 8
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": rtt_ms,
                 "downloadThroughput": throughput, "uploadThroughput": throughput})  # fmt: skip
        runs = []
        for _ in ("cold", "warm"):
            page.goto(url, wait_until="load") if not runs else page.reload(wait_until="load")
            page.wait_for_timeout(200)
            runs.append(page.evaluate(TIMINGS))
        browser.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-slowdown", type=float, default=4.0)
    parser.add_argument("--down-kbps", type=int, default=1600)
    parser.add_argument("--rtt-ms", type=int, default=150)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="bench-paint-")) / "ui.log"
    ui = ui_process(port=pick_free_port(), log_path=log).start()
    try:
        ui.wait_ready()
        runs = measure(ui.base_url + "/", args.cpu_slowdown, args.down_kbps, args.rtt_ms)
    finally:
        ui.stop()
    print(f"machine: {machine_description()}; load {load_average()}")
    print(f"CPU {args.cpu_slowdown}x slower, {args.down_kbps} kbit/s down, {args.rtt_ms} ms round trip")
    for name, run in zip(("cold cache", "warm cache"), runs, strict=True):
        print(f"{name}: first contentful paint {run['fcp']:.0f} ms, DOMContentLoaded done {run['dcl']:.0f} ms, "
              f"{run['bytes'] / 1024:.1f} KiB transferred")  # fmt: skip


if __name__ == "__main__":
    main()
