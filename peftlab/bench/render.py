"""The report as Markdown and as a self-contained HTML page (figures inline as base64 PNG,
nothing fetched from elsewhere).

A report is a list of sections ``(title, blocks)``; a block is ``("table", header, rows)``,
``("list", items)`` or ``("text", paragraph)``, with text in Markdown's inline forms only
(``**bold**``, ``*italic*``, single-backtick code). The HTML turns those into tags, so no
markup leaks into the page as literal characters.
"""

from __future__ import annotations

import base64
import html
import re

TITLE = "peftlab compare — report"
_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`|\*([^*\s][^*]*?)\*")


def inline(text: str) -> str:
    """Markdown inline text as escaped HTML: ``**b**`` → <strong>, code → <code>,
    ``*i*`` → <em>; everything else escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        bold, code, em = m.groups()
        if bold is not None:
            out.append(f"<strong>{inline(bold)}</strong>")
        elif code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        else:
            out.append(f"<em>{inline(em)}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def markdown(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    md = [f"# {TITLE}", ""] + [f"- {s}" for s in settings] + [""]
    for title, blocks in sections:
        md += [f"## {title}", ""]
        for kind, *body in blocks:
            if kind == "table":
                md += [md_table(*body), ""]
            elif kind == "list":
                md += [f"- {item}" for item in body[0]] + [""]
            else:
                md += [body[0], ""]
    md += ["## Figures", ""] + [f"![{n}](figures/{n}.png)" for n in figs] + [""]
    return "\n".join(md)


def _block(kind: str, *body) -> str:
    if kind == "table":
        head = "".join(f"<th>{inline(str(c))}</th>" for c in body[0])
        trs = "".join(
            "<tr>" + "".join(f"<td>{inline(str(c))}</td>" for c in r) + "</tr>" for r in body[1]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{inline(str(i))}</li>" for i in body[0]) + "</ul>"
    return f"<p>{inline(body[0])}</p>"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em;line-height:1.4}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%;vertical-align:top}"
    "th{background:#eee}code{background:#f4f4f4;padding:0 2px}"
    "figure{display:inline-block;margin:1em}"
)


def page(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    """A self-contained page: figures inline as base64 PNG, nothing fetched from elsewhere."""
    parts = [_block("list", settings)]
    for title, blocks in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(_block(*b) for b in blocks))
    imgs = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
        f"<figcaption>{n.replace('_', ' ')}</figcaption></figure>"
        for n, d in figs.items()
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{TITLE}'
        f"</title>\n<style>{STYLE}</style>\n</head><body><h1>{TITLE}</h1>\n"
        + "\n".join(parts)
        + f"\n<h2>Figures</h2>{imgs}\n</body></html>\n"
    )
