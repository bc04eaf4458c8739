"""Template-browser thumbnails (example_workflows/<name>.jpg) from the browser test's screenshots.

Run after `pytest tests/e2e/test_browser.py` wrote artifacts/browser/example-<name>.png:
    .host/0.33.0/venv/bin/python scripts/make_thumbnails.py
"""

import sys
from pathlib import Path

from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "artifacts" / "browser"
# the graph canvas inside a 1600 x 1000 screenshot: no side bar, tab bar, toolbar or minimap
CANVAS = (70, 140, 1330, 730)


def thumbnail(shot: Path, target: Path, width: int = 512) -> None:
    canvas = Image.open(shot).convert("RGB").crop(CANVAS)
    background = Image.new("RGB", canvas.size, canvas.getpixel((5, 5)))
    box = ImageChops.difference(canvas, background).convert("L").point(lambda v: 255 if v > 24 else 0).getbbox()
    if box:
        pad = 16
        canvas = canvas.crop((max(box[0] - pad, 0), max(box[1] - pad, 0),
                              min(box[2] + pad, canvas.width), min(box[3] + pad, canvas.height)))
    height = round(canvas.height * width / canvas.width)
    canvas.resize((width, height), Image.LANCZOS).save(target, "JPEG", quality=85, optimize=True)


def main() -> int:
    made = 0
    for workflow in sorted((REPO / "example_workflows").glob("*.json")):
        shot = SHOTS / f"example-{workflow.stem}.png"
        if not shot.is_file():
            print(f"no screenshot {shot}; run tests/e2e/test_browser.py first", file=sys.stderr)
            continue
        thumbnail(shot, workflow.with_suffix(".jpg"))
        made += 1
        print(f"wrote {workflow.with_suffix('.jpg').relative_to(REPO)}")
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
