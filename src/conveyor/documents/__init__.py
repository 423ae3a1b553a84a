"""Document ingestion, an optional workload (``CONVEYOR_DOCUMENTS=true``, needs the
``conveyor[documents]`` extra): upload files, search their chunks.

    extract.py    text out of TXT/Markdown, HTML, PDF and DOCX, page by page
    chunking.py   overlapping windows of words, with page ranges and offsets
    embedding.py  all-MiniLM-L6-v2 with numpy, from the packaged weights
    store.py      documents, chunks, vectors; hybrid search with rank fusion
    tasks.py      the pipeline's tasks (``install``) and its submission (``ingest``)
    api.py        ``/v1/documents`` and ``/v1/search``
"""
