"""Markdown → one self-contained HTML page: ``report.md`` → ``report.html``, predict's patient pages.

Why: a report that is a folder of markdown and PNGs is opened by few radiologists or reviewers;
one file that opens in any browser, offline, and can be mailed or archived is. The page is rendered
FROM the markdown (never a second report generator), so whatever ``report.md`` gains appears in it.

* Rendering: `markdown-it-py <https://markdown-it-py.readthedocs.io>`_ (CommonMark + GFM tables;
  maintained, already installed with ``rich``) with raw HTML off, so nothing in a cell can inject
  markup.
* Self-contained: every local image becomes a ``data:`` URI (base64), there is no script, no
  external style sheet, font or request: the page renders the same from a USB stick.
* Accessible: ``lang``, a viewport, one ``<main>``, headings kept with ids and a contents list of
  the ``##`` sections; every image keeps its markdown alt text (the file name when it has none);
  wide tables scroll inside their own region instead of the page; text width capped for reading
  at 1280 px.
"""

from __future__ import annotations

import base64
import html
import logging
import mimetypes
import re
from pathlib import Path
from urllib.parse import unquote

from crc_lightning.io.errors import InputError
from crc_lightning.io.files import write_atomic

log = logging.getLogger(__name__)

__all__ = ["CSS", "render_markdown", "write_html", "write_report_html"]

CSS = """
:root { color-scheme: light; --ink: #1b1f24; --muted: #57606a; --line: #d0d7de; --band: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; font: 16px/1.55 system-ui, -apple-system,
  "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 76rem; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.9rem; margin: 0.5rem 0 1rem; }
h2 { font-size: 1.45rem; margin: 2.2rem 0 0.8rem; padding-bottom: 0.3rem;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 1.15rem; margin: 1.6rem 0 0.6rem; }
p, li { max-width: 60rem; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--band);
  padding: 0.1em 0.3em; border-radius: 4px; }
blockquote { margin: 1rem 0; padding: 0.6rem 1rem; border-left: 4px solid #bf8700;
  background: #fff8c5; }
nav.toc { background: var(--band); border: 1px solid var(--line); border-radius: 6px;
  padding: 0.6rem 1.2rem; margin: 1rem 0 1.5rem; }
nav.toc ol { margin: 0.3rem 0; padding-left: 1.4rem; }
.table-wrap { overflow-x: auto; margin: 0.8rem 0 1.4rem; border: 1px solid var(--line);
  border-radius: 6px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 0.92rem;
  width: max-content; min-width: 100%; }
th, td { padding: 0.35rem 0.7rem; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: var(--band); font-weight: 600; }
tbody tr:nth-child(even) { background: #fbfcfd; }
img { max-width: 100%; height: auto; display: block; margin: 0.6rem 0 1.2rem;
  border: 1px solid var(--line); border-radius: 4px; background: #fff; }
footer { color: var(--muted); font-size: 0.85rem; margin-top: 3rem; }
"""

_SLUG = re.compile(r"[^\w]+")


def _slug(text: str, seen: dict[str, int]) -> str:
    base = _SLUG.sub("-", text.lower()).strip("-") or "section"
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _is_local(src: str) -> bool:
    return bool(src) and not re.match(r"^[a-z][a-z0-9+.-]*:", src, re.IGNORECASE)


def render_markdown(text: str, base_dir: str | Path, title: str | None = None) -> str:
    """The HTML page of markdown ``text`` whose relative image paths are under ``base_dir``.

    Local images are embedded as ``data:`` URIs; a missing one is an :class:`InputError` naming
    it (a page with a broken figure is not written). ``title`` defaults to the first heading.
    """
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    base = Path(base_dir)
    seen: dict[str, int] = {}
    contents: list[tuple[str, str]] = []
    first_heading = None
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            inline = tokens[i + 1]
            label = "".join(
                c.content for c in inline.children or [] if c.type in ("text", "code_inline")
            )
            anchor = _slug(label, seen)
            tok.attrSet("id", anchor)
            first_heading = first_heading or label
            if tok.tag == "h2":
                contents.append((anchor, label))
        if tok.type != "inline":
            continue
        for child in tok.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            if not _is_local(src):
                continue
            path = (base / unquote(src)).resolve()  # markdown-it percent-encodes the link
            if not path.is_file():
                raise InputError(path, "figure referenced by the markdown is missing")
            child.attrSet("src", _data_uri(path))
            if not (child.content or "").strip():  # the alt text is the image's label
                from markdown_it.token import Token

                child.children = [Token("text", "", 0, content=path.stem.replace("_", " "))]
                log.warning("image %s has no alt text in the markdown: using its file name", src)
    body = md.renderer.render(tokens, md.options, {})
    body = body.replace("<table>", '<div class="table-wrap" role="region" tabindex="0"><table>')
    body = body.replace("</table>", "</table></div>")
    page_title = title or first_heading or "Report"
    toc = ""
    if len(contents) > 1:
        items = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in contents)
        toc = f'<nav class="toc" aria-label="Contents"><strong>Contents</strong><ol>{items}</ol></nav>'
    if toc and "</h1>" in body:
        body = body.replace("</h1>", "</h1>\n" + toc, 1)
    else:
        body = toc + body
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(page_title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )


def write_html(markdown: str, path: str | Path, base_dir: str | Path | None = None,
               title: str | None = None) -> Path:  # fmt: skip
    """Render ``markdown`` (images relative to ``base_dir``, default: the page's folder) and write
    the page atomically to ``path``."""
    path = Path(path)
    page = render_markdown(markdown, base_dir if base_dir is not None else path.parent, title)
    return write_atomic(path, page)


def write_report_html(report_md: str | Path) -> Path:
    """``report.html`` beside ``report.md``, rendered from it (the one call at the end of report
    writing); returns its path."""
    report_md = Path(report_md)
    return write_html(
        report_md.read_text(encoding="utf-8"), report_md.with_suffix(".html"), report_md.parent
    )
