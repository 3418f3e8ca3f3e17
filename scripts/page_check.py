"""Headless Chromium on `taskfed serve`'s page: sends one input through the page (its ?q= parameter), and
returns the DOM after the answer arrived; with --screenshot, saves what a person sees.

    python scripts/page_check.py http://127.0.0.1:8000 "Is this review positive? great acting" --screenshot page.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from urllib.parse import quote


def check_page(chromium: str, url: str, text: str, screenshot: str | None) -> str:
    """The page's DOM once the query was answered (Chromium's virtual time runs the page's scripts first)."""
    page = f"{url.rstrip('/')}/?q={quote(text)}"
    with tempfile.TemporaryDirectory() as profile:
        common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                  f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1000,900"]
        dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
        if screenshot:
            subprocess.run([*common, f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True)
    return dom


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("text")
    ap.add_argument("--screenshot")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args()
    dom = check_page(args.chromium, args.url, args.text, args.screenshot)
    ok = 'id="chosen"' in dom and 'id="answer"' in dom
    print("routing decision in the DOM:" if ok else "no routing decision in the DOM:",
          dom[dom.find('id="chosen"') - 3:][:200] if ok else dom[-500:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
