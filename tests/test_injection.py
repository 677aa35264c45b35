"""Untrusted text (trigger, prompts, licences, sources, artists, captions, paths) through to the
Markdown we publish: the model card (models/hub/README.md) and reports/caption/preview.md, rendered
with a CommonMark renderer (markdown-it-py, in requirements.lock): no raw HTML, no <script>, no
image but ours, and the usage snippet is Python that evaluates to the exact prompt."""
import ast
import html as htmllib
import json
import re
import subprocess

import pyarrow as pa
import pytest
import yaml
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from PIL import Image

from stages import caption as caption_stage
from stages import publish
from stages.core import params, shards
from stages.core.images import encode_png
from stages.core.markdown import code, py, text
from stages.core.paths import Caption
from tests import pubkit

EVIL = ('<script>alert(1)</script> <img src=x onerror=alert(2)> ![t](http://evil.example/t.png) '
        '[l](javascript:alert(3)) **b** | cell `tick` ``` &amp; {{7*7}}')
TRIGGER = 'impr" + str(7*7) + "\\ \'{{7*7}}\' <b>x</b> `t`'


def _render(md_text: str):
    md = MarkdownIt("commonmark").enable("table")  # the commonmark preset passes raw HTML through
    return md.parse(md_text), md.render(md_text)


def _assert_inert(md_text: str, own_images: str) -> str:
    tokens, html = _render(md_text)
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in (t.children or [])}
    assert not kinds & {"html_block", "html_inline"}, "raw HTML passed through"
    assert "<script" not in html
    for tag in re.findall(r"<img[^>]*>", html):
        assert re.fullmatch(r'<img src="[^"]*" alt="[^"]*" />', tag) and tag[10:].startswith(own_images), tag
    assert "javascript:" not in " ".join(re.findall(r'href="([^"]*)"', html))
    assert "evil.example" not in " ".join(re.findall(r'(?:src|href)="([^"]*)"', html))
    return html


@pytest.mark.parametrize("value", [EVIL, TRIGGER, "", "``", "a\n# heading\n- item"])
def test_markdown_helpers_render_the_text_itself(value):
    one_line = " ".join(value.split())
    for md in (text(value), code(value)):
        html = _assert_inert(f"x {md} y\n", own_images="never")
        assert "<h1>" not in html and "<li>" not in html
    if one_line:
        shown = MarkdownIt("commonmark").renderInline(code(value))
        assert htmllib.unescape(re.fullmatch(r"<code>(.*)</code>", shown)[1]) == one_line
        assert htmllib.unescape(MarkdownIt("commonmark").renderInline(text(value))) == one_line
    assert ast.literal_eval(py(value)) == value


@pytest.fixture(scope="module")
def hostile_card(tmp_path_factory):
    root = tmp_path_factory.mktemp("inject") / "project"
    pubkit.make_project(root, base="black-forest-labs/FLUX.1-dev")
    index = json.loads((root / "reports/samples/index.json").read_text())
    index["trigger"] = TRIGGER
    for im in index["images"]:
        im["full_prompt"] = f"{im['prompt']} {EVIL}, {TRIGGER}"
    (root / "reports/samples/index.json").write_text(json.dumps(index))
    for split in ("train", "holdout"):
        for f in (root / "data/curated" / split).glob("*.parquet"):
            f.unlink()
        data = encode_png(Image.new("RGB", (32, 32), (1, 2, 3)))
        shards.write_shards([{"id": shards.content_id(data), "image": data, "format": "png", "width": 32,
                              "height": 32, "source": EVIL, "artist": EVIL, "caption": EVIL, "license": EVIL}],
                            root / "data/curated" / split, shard_rows=8)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"].update(source="folder", path=f"/pics/{EVIL}")
    p["caption"]["model"] = EVIL
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    subprocess.run("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm fixture",
                   cwd=root, shell=True, check=True)
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(root)
        assert publish.main(["--repo-id", 'someone/x"); import os; ("']) == 0
    finally:
        mp.undo()
    return root / "models/hub/README.md", index


def test_model_card_renders_no_html_and_no_foreign_image(hostile_card):
    readme, _ = hostile_card
    card = ModelCard.load(readme)
    html = _assert_inert(card.text, own_images="images/")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text, licence and source included
    assert card.data.instance_prompt == TRIGGER  # the YAML front matter holds it exactly


def test_usage_snippet_is_python_that_evaluates_to_the_exact_prompt(hostile_card):
    readme, index = hostile_card
    snippet = re.search(r"```python\n(.*?)\n```", ModelCard.load(readme).text, re.S)[1]
    tree = ast.parse(snippet)
    calls = {getattr(n.func, "attr", getattr(n.func, "id", None)): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    prompt = ast.literal_eval(calls["pipe"].args[0])
    assert prompt == index["images"][0]["full_prompt"] and prompt.endswith(TRIGGER)
    assert ast.literal_eval(calls["load_lora_weights"].args[0]) == 'someone/x"); import os; ("'
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and n.names[0].name == "os" for n in ast.walk(tree))


def test_caption_preview_escapes_captions(tmp_path):
    rows = []
    for i in range(3):
        data = encode_png(Image.new("RGB", (40 + i, 30), (60 * i, 120, 200)))
        rows.append(dict(id=shards.content_id(data), image=data, format="PNG", width=40 + i, height=30,
                         source="folder", artist=None, genre=None, description=None, caption=f"{EVIL} {i}"))
    shards.write_shards(rows, tmp_path / "raw", shard_rows=5)
    shards.write_table(pa.table({"id": [r["id"] for r in rows], "kept": [True] * 3, "reason": [None] * 3}),
                       tmp_path / "filter.parquet")
    p = params.validate(params.Params().model_dump())
    p = p.model_copy(update={"data": p.data.model_copy(update={"holdout": 0.0})})  # the stage keeps every image
    paths = Caption(shards=tmp_path / "raw", filter=tmp_path / "filter.parquet", curated=tmp_path / "curated",
                    reports=tmp_path / "reports")
    caption_stage.run(p, paths)
    preview = (paths.reports / "preview.md").read_text()
    html = _assert_inert(preview, own_images=("thumbs/", "lengths.png"))
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3
    assert len(re.findall(r"<tr>", html)) == 4  # header + 3 rows: a '|' in a caption splits no cell
