"""Text out of a file, page by page: plain text, Markdown, HTML, PDF and DOCX.

Every failure is an :class:`~conveyor.errors.ExtractionFailed` naming the reason
(unsupported type, corrupt, encrypted, no text layer), which the job does not retry.
PDFs are read with pypdfium2 (PDFium, Apache/BSD), DOCX with python-docx, HTML
with lxml, dropping scripts, navigation and other boilerplate around the main text.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ExtractionFailed

#: File suffixes by the kind of extraction they get.
KINDS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
#: Elements around the main text of a page, not part of it.
_BOILERPLATE = (
    "script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form",
    "iframe", "svg", "button",
)  # fmt: skip
_BLANKS = re.compile(r"[ \t\r\f\v]+")
_MANY_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Page:
    """A page's text; ``number`` counts from 1 (formats without pages have one)."""

    number: int
    text: str


def kind_of(filename: str) -> str | None:
    """The extraction a file gets, by its suffix; None when it is not supported."""
    return KINDS.get(Path(filename).suffix.lower())


def extract(path: Path, filename: str) -> list[Page]:
    """The pages of text of the file at ``path``, uploaded as ``filename``."""
    kind = kind_of(filename)
    if kind is None:
        supported = ", ".join(sorted(KINDS))
        raise ExtractionFailed(
            f"unsupported file type {Path(filename).suffix or '(none)'!r}; supported: {supported}"
        )
    pages = {"text": _text, "html": _html, "pdf": _pdf, "docx": _docx}[kind](path)
    pages = [Page(p.number, _tidy(p.text)) for p in pages]
    if not any(p.text for p in pages):
        if kind == "pdf":
            raise ExtractionFailed(
                f"the PDF has no text layer on any of its {len(pages)} pages"
                " (a scan?); run OCR on it first"
            )
        raise ExtractionFailed("the document has no text")
    return pages


def _tidy(text: str) -> str:
    lines = (_BLANKS.sub(" ", line).strip() for line in text.replace("\x00", "").splitlines())
    return _MANY_LINES.sub("\n\n", "\n".join(lines)).strip()


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace")
    if b"\x00" in data[:4096]:  # text in UTF-8 or Latin-1 never holds a NUL byte
        raise ExtractionFailed("the file is binary, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _text(path: Path) -> list[Page]:
    return [Page(1, _decode(path.read_bytes()))]


def _html(path: Path) -> list[Page]:
    import lxml.etree
    import lxml.html

    data = path.read_bytes()
    if not data.strip():
        return [Page(1, "")]
    try:
        root = lxml.html.document_fromstring(data)
    except (lxml.etree.ParserError, ValueError) as exc:
        raise ExtractionFailed(f"the HTML cannot be parsed: {exc}") from None
    for element in root.xpath("|".join(f"//{tag}" for tag in _BOILERPLATE)):
        element.drop_tree()
    # The main text when the page marks it; the whole body otherwise.
    main = root.xpath("//main") or root.xpath("//article") or root.xpath("//body") or [root]
    blocks = "p|h1|h2|h3|h4|h5|h6|li|pre|blockquote|td|th|dt|dd|div|section|br|tr"
    for element in main[0].iter(*blocks.split("|")):
        element.tail = f"\n{element.tail or ''}"
    return [Page(1, "\n".join(m.text_content() for m in main))]


def _pdf(path: Path) -> list[Page]:
    import pypdfium2

    try:
        document = pypdfium2.PdfDocument(str(path))
    except pypdfium2.PdfiumError as exc:
        message = str(exc).lower()
        if "password" in message or "security" in message:
            raise ExtractionFailed("the PDF is encrypted (password protected)") from None
        raise ExtractionFailed(f"the PDF is corrupt or not a PDF: {exc}") from None
    pages = []
    try:
        for index in range(len(document)):
            page = document[index]
            textpage = page.get_textpage()
            try:
                pages.append(Page(index + 1, textpage.get_text_bounded()))
            finally:
                textpage.close()
                page.close()
    finally:
        document.close()
    return pages


def _docx(path: Path) -> list[Page]:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        # An encrypted DOCX is an OLE container, not a zip: it fails here as well.
        raise ExtractionFailed(f"the DOCX is corrupt, encrypted or not a DOCX: {exc}") from None
    parts: list[str] = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            cells = list(dict.fromkeys(cell.text.strip() for cell in row.cells))
            parts.append(" | ".join(c for c in cells if c))
    return [Page(1, "\n".join(parts))]
