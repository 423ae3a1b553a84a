"""Documents made at test time: a multi-page PDF (reportlab), a long PDF of generated
prose, a DOCX with a table (python-docx), an HTML page with boilerplate, and broken
ones (corrupt, encrypted, scanned with no text layer)."""

from __future__ import annotations

import random
from pathlib import Path

#: Page 3 of the PDF says this; searches find it by paraphrase and by its rare word.
PAGE_THREE = (
    "The lighthouse keeper trimmed the lamp wick every evening before the storm arrived,"
    " and the zephyranthes bulbs in the window box bloomed after the rain."
)
FILLER = {
    1: "Quarterly revenue grew across every region while operating costs stayed flat.",
    2: "The database migration added two tables and an index on the collection column.",
    4: "Volunteers repainted the community hall and planted oak saplings along the road.",
}


def pdf(path: Path, *, pages: int = 4, encrypt: str | None = None) -> Path:
    """A PDF whose page 3 says :data:`PAGE_THREE`; others say a line of :data:`FILLER`."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    sheet = canvas.Canvas(str(path), pagesize=A4, encrypt=encrypt)
    for number in range(1, pages + 1):
        text = PAGE_THREE if number == 3 else FILLER.get(number, f"Page {number} of filler.")
        lines = sheet.beginText(50, 780)
        words = text.split()
        for start in range(0, len(words), 10):
            lines.textLine(" ".join(words[start : start + 10]))
        sheet.drawText(lines)
        sheet.showPage()
    sheet.save()
    return path


#: Words the long PDF's sentences are drawn from: ordinary prose, so the model sees
#: text like a real document's rather than one repeated token.
VOCABULARY = (
    "the a an of to in on for with by from about after before under over between"
    " court contract party clause notice payment delivery tenant landlord witness"
    " evidence record hearing judge counsel agreement term breach damages claim"
    " river harbour village market winter summer garden bridge station library"
    " engineer teacher farmer doctor sailor baker writer painter builder keeper"
    " signed reviewed delivered filed argued measured repaired planted painted"
    " quickly carefully rarely often later early again together alone"
)


def long_pdf(path: Path, *, pages: int, words_per_page: int = 300, seed: int = 13) -> Path:
    """A PDF of ``pages`` pages of generated sentences (the same for the same seed);
    page N ends with the marker word ``pageN`` so a search can find any page."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    rng = random.Random(seed)
    vocabulary = VOCABULARY.split()
    sheet = canvas.Canvas(str(path), pagesize=A4)
    for number in range(1, pages + 1):
        words = [rng.choice(vocabulary) for _ in range(words_per_page - 1)] + [f"page{number}"]
        lines = sheet.beginText(40, 800)
        lines.setFont("Helvetica", 8)
        for start in range(0, len(words), 16):
            lines.textLine(" ".join(words[start : start + 16]))
        sheet.drawText(lines)
        sheet.showPage()
    sheet.save()
    return path


def scanned_pdf(path: Path) -> Path:
    """Two pages of drawing and no text: what a scanner without OCR produces."""
    from reportlab.pdfgen import canvas

    sheet = canvas.Canvas(str(path))
    for _ in range(2):
        sheet.rect(50, 50, 400, 600, fill=1)
        sheet.showPage()
    sheet.save()
    return path


def docx(path: Path) -> Path:
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading("Onboarding checklist", level=1)
    document.add_paragraph("New engineers receive a laptop and a badge on their first morning.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Owner"
    table.cell(0, 1).text = "Task"
    table.cell(1, 0).text = "Facilities"
    table.cell(1, 1).text = "Issue the quokka parking permit"
    document.save(str(path))
    return path


def html(path: Path) -> Path:
    path.write_text(
        "<html><head><title>Recipes</title><style>p { color: red }</style>"
        "<script>var tracking = 'scriptword';</script></head><body>"
        "<nav>Home | About | navword</nav>"
        "<main><h1>Bread</h1><p>Knead the dough for ten minutes, then let it rise"
        " until doubled.</p><p>Bake at 220 degrees.</p></main>"
        "<footer>Copyright footerword</footer></body></html>",
        encoding="utf-8",
    )
    return path
