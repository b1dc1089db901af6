"""The blocks as GitHub markdown and as one self-contained HTML page; ``write_report`` writes both and the PNGs."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2v.report.blocks import Bullets, Code, Details, H, Img, P, Table, report_blocks
from d2v.report.build import Report

# ----------------------------------------------------------------------------------------------- markdown


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(rep: Report, image_dir: str) -> str:
    """The report as GitHub markdown; figures linked as ``<image_dir>/<name>.png``."""
    lines: list[str] = []

    def emit(b: Any) -> None:
        if isinstance(b, H):
            lines.extend(["#" * b.level + " " + b.text, ""])
        elif isinstance(b, P):
            lines.extend([b.text, ""])
        elif isinstance(b, Bullets):
            lines.extend([*(f"- {x}" for x in b.items), ""])
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
            lines.append("")
        elif isinstance(b, Img):
            lines.extend([f"![{b.figure.caption}]({image_dir}/{b.figure.name}.png)", ""])
        elif isinstance(b, Code):
            lines.extend([f"```{b.lang}", b.text.rstrip("\n"), "```", ""])
        elif isinstance(b, Details):
            lines.extend([f"**{b.summary}**", ""])
            for x in b.blocks:
                emit(x)
        else:
            raise AssertionError(f"unknown block {b!r}")

    for b in report_blocks(rep):
        emit(b)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
details { margin: 0.8em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _inline(text: str) -> str:
    """Escape, then the two inline markups the report uses: `code` and **bold**."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def render_html(rep: Report) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no scripts, no external links."""
    out: list[str] = []

    def emit(b: Any) -> None:
        if isinstance(b, H):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Img):
            data = base64.b64encode(b.figure.png).decode("ascii")
            cap = _inline(b.figure.caption)
            out.append(
                f'<figure><img alt="{html.escape(b.figure.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text, quote=False)}</code></pre>")
        elif isinstance(b, Details):
            out.append(f"<details><summary>{_inline(b.summary)}</summary>")
            for x in b.blocks:
                emit(x)
            out.append("</details>")
        else:
            raise AssertionError(f"unknown block {b!r}")

    for b in report_blocks(rep):
        emit(b)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>d2v benchmark</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def write_report(rep: Report, root: str | Path = ".") -> ReportFiles:
    """Write ``<reports>/benchmark.{md,html}`` and ``<plots>/report/<name>.png`` (stale PNGs removed)."""
    root = Path(root)
    reports = root / rep.paths.reports
    fig_dir = root / rep.paths.plots / "report"
    reports.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in rep.figures:
        p = fig_dir / f"{f.name}.png"
        p.write_bytes(f.png)
        written.append(p)
    for old in sorted(fig_dir.glob("*.png")):
        if old not in written and re.fullmatch(r"(budget|pretrain|confusion)_.+\.png", old.name):
            old.unlink()
    image_dir = Path(os.path.relpath(fig_dir, reports)).as_posix()
    md = reports / "benchmark.md"
    md.write_text(render_markdown(rep, image_dir), encoding="utf-8")
    page = reports / "benchmark.html"
    page.write_text(render_html(rep), encoding="utf-8")
    return ReportFiles(md, page, tuple(written))
