"""Build plots/offline.html: the HTML template `dvc plots show/diff` fills (`.dvc/config`
``[plots] html_template``), with vega, vega-lite and vega-embed inlined from the npm registry, so the
pages render with no network (DVC's own page loads them from a CDN and is blank offline).

    python plots/vendor.py        # = make plots-template; needs npm (the packages are BSD-3-Clause)

The versions are the ones DVC's renderer was written against (dvc_render.vega.VegaRenderer.SCRIPTS).
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
OUT = Path(__file__).with_name("offline.html")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC plots (offline: {versions}, inlined by plots/vendor.py)</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, into: Path) -> str:
    """``npm pack name@version`` -> the package's minified browser build (build/<name>.min.js)."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=into, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(into / out) as tar:
        js = tar.extractfile(f"package/build/{name}.min.js").read().decode("utf-8")
        licence = tar.extractfile("package/LICENSE").read().decode("utf-8").splitlines()[0]
    if "</script" in js:
        raise SystemExit(f"{name}: the build contains '</script': cannot inline it")
    return f"    <!-- {name}@{version} ({licence.strip()}) -->\n    <script>{js}</script>"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scripts = "\n".join(fetch(n, v, Path(tmp)) for n, v in PACKAGES.items())
    versions = ", ".join(f"{n}@{v}" for n, v in PACKAGES.items())
    # the placeholders DVC replaces are {plot_divs} and {refresh_tag}; no {scripts}: nothing from a CDN
    OUT.write_text(PAGE.format(versions=versions, scripts=scripts), encoding="utf-8")
    print(f"{OUT} ({OUT.stat().st_size / 1e6:.1f} MB): {versions}", file=sys.stderr)


if __name__ == "__main__":
    main()
