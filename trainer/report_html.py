"""`report.html`: the evaluation report as one self-contained page (a CI artifact a person opens).

The page is rendered from the same Markdown as `report.md` (markdown-it-py, CommonMark with
tables), so the two never say different things; each local PNG the Markdown shows is embedded as
a base64 `data:` URI, and the stylesheet is inline: no file beside it is needed.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from markdown_it import MarkdownIt

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f5f5f5; padding: 0 0.2rem; }
img { max-width: 100%; }
blockquote { border-left: 4px solid #e0a000; margin: 1rem 0; padding: 0.25rem 1rem; background: #fff8e6; }
"""


def _embed_images(md: MarkdownIt, markdown: str, directory: Path) -> str:
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            source = str(child.attrGet("src") or "")
            path = directory / source
            if "/" in source or not source.endswith(".png") or not path.is_file():
                continue  # only the report's own plots; anything else is left as written
            child.attrSet("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
    return md.renderer.render(tokens, md.options, {})


def render_html(markdown: str, directory: Path, title: str) -> str:
    """The whole page for `markdown`, with the PNGs it names (files in `directory`) embedded."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = _embed_images(md, markdown, directory)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
