"""Document ingestion on this machine: extraction, embedding, upload to searchable, search.

    uv run python benchmarks/documents.py [--pages 200] [--chunks 100000] [--searches 100]

    1. stages    in this process, on a generated PDF of ``--pages`` pages of prose:
                 extraction (pages/s), chunking, and embedding every chunk the way the
                 embed task does (16 at a time), each with this process's user/sys CPU.
    2. ingest    ``conveyor api`` and ``conveyor worker -c 2`` (PostgreSQL, Redis, the
                 default chunking: 200 words, 40 shared, 32 chunks per embedding job):
                 the PDF uploaded over HTTP, then the time until the document is
                 ``ready`` and until a search finds its last page; user/sys CPU per
                 process; the pipeline's own step timings from its jobs.
    3. search    ``--chunks`` rows put straight into the chunks table (random unit
                 vectors, generated text) under ``--documents`` ready documents; the
                 store's search alone (no HTTP, no query embedding) in this process,
                 scanning the stored vectors and with the in-memory index (its first
                 load, its text and vector parts, its refresh after another store adds
                 and deletes a document); EXPLAIN ANALYZE of the full-text ranking;
                 then ``--searches`` sequential ``GET /v1/search``: p50/p99/max.
    4. sqlite    part 3's store figures (scan, index) on a SQLite file, and the plan
                 of its FTS5 query.

It DROPS AND RECREATES the PostgreSQL database of ``--postgres-url`` and FLUSHES the
Redis database of ``--redis-url``; it refuses to start when the database exists or the
Redis database holds keys (``--force`` overrides). Needs the dev group (reportlab).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg
import redis
from harness import (
    CLOCK_TICKS,
    Processes,
    Servers,
    check_redis_url,
    check_unused,
    drop_database,
    free_port,
    machine_line,
    percentile,
    recreate_database,
    wait_for,
)

from conveyor.documents.chunking import Chunk, chunk
from conveyor.documents.embedding import DIMENSION, default_embedder
from conveyor.documents.extract import extract
from conveyor.documents.store import DocumentStore
from conveyor.documents.tasks import ENCODE_AT_ONCE
from conveyor.documents.vectors import VectorIndex
from conveyor.settings import Settings
from conveyor.store import Store

#: The words of the generated prose: ordinary vocabulary, so the model and the text
#: index see text shaped like a document's.
VOCABULARY = (
    "the a an of to in on for with by from about after before under over between"
    " court contract party clause notice payment delivery tenant landlord witness"
    " evidence record hearing judge counsel agreement term breach damages claim"
    " river harbour village market winter summer garden bridge station library"
    " engineer teacher farmer doctor sailor baker writer painter builder keeper"
    " signed reviewed delivered filed argued measured repaired planted painted"
    " quickly carefully rarely often later early again together alone"
)
QUERIES = (
    "breach of the tenancy agreement",
    "who repaired the bridge",
    "payment notice filed late",
    "the judge heard the witness",
    "a garden by the river in summer",
)


def prose(rng: random.Random, words: int) -> list[str]:
    vocabulary = VOCABULARY.split()
    return [rng.choice(vocabulary) for _ in range(words)]


def make_pdf(path: Path, pages: int, words_per_page: int) -> Path:
    """``pages`` pages of prose; page N ends with the word ``pageN``."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    rng = random.Random(13)
    sheet = canvas.Canvas(str(path), pagesize=A4)
    for number in range(1, pages + 1):
        words = [*prose(rng, words_per_page - 1), f"page{number}"]
        lines = sheet.beginText(40, 800)
        lines.setFont("Helvetica", 8)
        for start in range(0, len(words), 16):
            lines.textLine(" ".join(words[start : start + 16]))
        sheet.drawText(lines)
        sheet.showPage()
    sheet.save()
    return path


# -- CPU, user and system apart -----------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    user: float
    system: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __str__(self) -> str:
        return f"user {self.user:7.2f} s  sys {self.system:6.2f} s"


def own_cpu() -> Cpu:
    times = os.times()
    return Cpu(times.user, times.system)


def _stat(pid: int) -> tuple[int, int, Cpu, Cpu] | None:
    """(parent, process group, own CPU, reaped children's CPU) from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()
    own = Cpu(int(f[11]) / CLOCK_TICKS, int(f[12]) / CLOCK_TICKS)
    reaped = Cpu(int(f[13]) / CLOCK_TICKS, int(f[14]) / CLOCK_TICKS)
    return int(f[1]), int(f[2]), own, reaped


def _all_stats() -> dict[int, tuple[int, int, Cpu, Cpu]]:
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def cpu_by_process(groups: dict[str, int], servers: Servers) -> dict[str, Cpu]:
    """CPU so far of each process of the named process groups (``name``, ``name pool
    PID``), and of PostgreSQL (postmaster, backends, reaped backends) and Redis."""
    stats = _all_stats()
    found: dict[str, Cpu] = {}
    for name, group in groups.items():
        for pid, (_, pgrp, own, reaped) in sorted(stats.items()):
            if pgrp != group:
                continue
            label = name if pid == group else f"{name} pool {pid}"
            found[label] = Cpu(own.user + reaped.user, own.system + reaped.system)
    for label, server in (("postgres", servers.postgres), ("redis", servers.redis)):
        if server is None:
            continue
        total = Cpu(0.0, 0.0)
        for pid, (parent, _, own, reaped) in stats.items():
            if server in (pid, parent):
                total = Cpu(
                    total.user + own.user + reaped.user, total.system + own.system + reaped.system
                )
        found[label] = total
    return found


def cpu_lines(before: dict[str, Cpu], after: dict[str, Cpu]) -> list[str]:
    zero = Cpu(0.0, 0.0)
    return [f"    {name:<22} {after[name] - before.get(name, zero)}" for name in after]


# -- 1. the stages in this process ------------------------------------------------------


def stages(pdf: Path) -> list[str]:
    lines = ["1. stages, in this process (numpy with its BLAS threads as installed)"]
    cpu, wall = own_cpu(), time.perf_counter()
    pages = extract(pdf, pdf.name)
    wall, cpu = time.perf_counter() - wall, own_cpu() - cpu
    lines.append(
        f"  extract  {len(pages)} pages in {wall:.2f} s: {len(pages) / wall:.0f} pages/s   {cpu}"
    )
    wall = time.perf_counter()
    chunks = chunk(pages, size=200, overlap=40)
    wall = time.perf_counter() - wall
    lines.append(f"  chunk    {len(chunks)} chunks of 200 words in {wall * 1000:.0f} ms")
    embedder = default_embedder()
    embedder.embed(["warm up"])  # the weights' first touch
    texts = [c.text for c in chunks]
    cpu, wall = own_cpu(), time.perf_counter()
    for start in range(0, len(texts), ENCODE_AT_ONCE):
        embedder.embed(texts[start : start + ENCODE_AT_ONCE])
    wall, cpu = time.perf_counter() - wall, own_cpu() - cpu
    lines.append(
        f"  embed    {len(texts)} chunks in {wall:.1f} s: {len(texts) / wall:.2f} chunks/s   {cpu}"
    )
    short = [" ".join(prose(random.Random(i), 12)) for i in range(256)]
    wall = time.perf_counter()
    for start in range(0, len(short), 64):
        embedder.embed(short[start : start + 64])
    wall = time.perf_counter() - wall
    lines.append(
        f"  embed    {len(short)} sentences of 12 words, 64 at a time:"
        f" {len(short) / wall:.0f} sentences/s"
    )
    return lines


# -- 2. upload to searchable through real processes ---------------------------------------


def ingest(args: argparse.Namespace, pdf: Path, env: dict[str, str], log_dir: Path) -> list[str]:
    lines = ["2. upload to searchable: conveyor api + conveyor worker -c 2, PostgreSQL + Redis"]
    processes = Processes(log_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = Servers.find(args.postgres_url, args.redis_url)
    python = [sys.executable, "-m", "conveyor"]
    try:
        groups = {
            "api": processes.start("api", [*python, "api", "--port", str(port)], env),
            "worker": processes.start("worker", [*python, "worker", "-c", "2"], env),
        }

        def ready() -> bool:
            processes.check("api")
            processes.check("worker")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=120, what="the API")
        headers = {"Authorization": f"Bearer {env['CONVEYOR_ADMIN_KEY']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            time.sleep(5)  # the worker's pool forked and idle, as a running service's
            before = cpu_by_process(groups, servers)
            start = time.perf_counter()
            with pdf.open("rb") as file:
                sent = client.post("/v1/documents", files={"file": (pdf.name, file)})
            sent.raise_for_status()
            uploaded = time.perf_counter() - start
            document_id = sent.json()["document_id"]

            def status() -> str:
                processes.check("worker")
                return str(client.get(f"/v1/documents/{document_id}").json()["status"])

            wait_for(lambda: status() in {"ready", "failed"}, timeout=1800, what="ready", every=0.2)
            ready_at = time.perf_counter() - start
            after = cpu_by_process(groups, servers)
            last = f"page{args.pages}"
            # k=10: fused scores tie at 1/61 between the best text hit and the best vector hit.
            found = client.get("/v1/search", params={"q": last, "k": 10}).json()["results"]
            searchable = time.perf_counter() - start
            document = client.get(f"/v1/documents/{document_id}").json()
            pipeline = client.get(f"/v1/pipelines/{document['pipeline_id']}").json()
            steps = {s["name"]: [client.get(f"/v1/jobs/{j['id']}").json() for j in s["jobs"]]
                     for s in pipeline["steps"]}  # fmt: skip
        assert document["status"] == "ready", document
        if not any(last in hit["text"] for hit in found):
            lines.append(f"  !! a search for {last!r} did not find its chunk: {found}")
        lines.append(
            f"  {document['pages']} pages, {document['chunks']} chunks:"
            f" upload answered in {uploaded:.2f} s, ready after {ready_at:.1f} s,"
            f" its last page found by search after {searchable:.1f} s"
        )
        for name, jobs in steps.items():
            started = min(_seconds(j["started_at"]) for j in jobs)
            ended = max(_seconds(j["finished_at"]) for j in jobs)
            own = sum(_seconds(j["finished_at"]) - _seconds(j["started_at"]) for j in jobs)
            lines.append(
                f"  step {name:<8} {len(jobs):3d} jobs, {ended - started:6.2f} s first start"
                f" to last end, {own:6.2f} s inside jobs"
            )
        embed = steps["embed"]
        span = max(_seconds(j["finished_at"]) for j in embed) - min(
            _seconds(j["started_at"]) for j in embed
        )
        extract_job = steps["extract"][0]
        extract_s = _seconds(extract_job["finished_at"]) - _seconds(extract_job["started_at"])
        lines.append(
            f"  extract {document['pages'] / extract_s:.0f} pages/s (inside its job);"
            f" embed {document['chunks'] / span:.2f} chunks/s over both pool processes"
        )
        lines.append("  CPU from upload to ready, per process:")
        lines += cpu_lines(before, after)
    finally:
        processes.stop_all()
    return lines


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


# -- 3. search with many chunks ------------------------------------------------------------


def fill(args: argparse.Namespace, store: DocumentStore, collection: str) -> float:
    """``--documents`` ready documents sharing ``--chunks`` chunks of 40 words, random
    unit vectors, put in by COPY; the seconds it took."""
    made = [
        store.create(
            collection=collection,
            filename=f"filled-{n}.txt",
            sha256=secrets.token_hex(32),
            size=0,
            metadata={},
            replace=False,
        )[0]
        for n in range(args.documents)
    ]
    per_document = -(-args.chunks // args.documents)
    rng = random.Random(7)
    vectors = np.random.default_rng(7).standard_normal((args.chunks, DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = time.perf_counter()
    dsn = args.postgres_url
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        columns = (
            "document_id, collection, ordinal, text, page_start, page_end,"
            " start_offset, end_offset, embedding"
        )
        with cursor.copy(f"COPY conveyor_document_chunks ({columns}) FROM STDIN") as copy:
            for n in range(args.chunks):
                text = " ".join(prose(rng, 40))
                ordinal = n % per_document
                page = 1 + ordinal // 4
                copy.write_row(
                    (
                        made[n // per_document].id, collection, ordinal, text, page, page, 0,
                        len(text), vectors[n].astype("<f4").tobytes(),
                    )
                )  # fmt: skip
    for n, document in enumerate(made):
        count = len(range(n * per_document, min((n + 1) * per_document, args.chunks)))
        store.set_status(document.id, "ready", chunk_count=count, pages=-(-count // 4))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE conveyor_document_chunks")
        conn.execute("VACUUM ANALYZE conveyor_documents")
    return time.perf_counter() - start


def text_plan(args: argparse.Namespace, collection: str) -> list[str]:
    """EXPLAIN ANALYZE of the full-text queries the store runs for each query (every
    word, then any word when every word finds fewer than 50), plus a word no chunk
    has: whether they read the GIN index, and their time."""
    lines = []
    with psycopg.connect(args.postgres_url) as conn:
        for query in (*QUERIES, "quixotic"):
            for joiner in (" ", " or "):
                plan = [
                    row[0]
                    for row in conn.execute(
                        "EXPLAIN (ANALYZE, COSTS OFF) SELECT c.id FROM conveyor_document_chunks c"
                        " JOIN conveyor_documents d ON d.id = c.document_id,"
                        " websearch_to_tsquery('english', %s) q"
                        " WHERE c.tsv @@ q AND d.status = 'ready' AND c.collection = %s"
                        " ORDER BY ts_rank(c.tsv, q) DESC, c.id LIMIT 50",
                        (joiner.join(query.split()), collection),
                    )
                ]
                index = any("ix_conveyor_document_chunks_tsv" in line for line in plan)
                scan = next(line.strip() for line in plan if "on conveyor_document_chunks" in line)
                took = next(line for line in plan if line.startswith("Execution Time"))
                lines.append(
                    f"    {query!r} ({'every' if joiner == ' ' else 'any'} word):"
                    f" GIN index {'used' if index else 'not used'}; {scan}; {took}"
                )
    return lines


def search(args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> list[str]:
    lines = [
        f"3. search with {args.chunks:,} chunks in {args.documents} ready documents of one"
        " collection (PostgreSQL)"
    ]
    store = Store(Settings(database_url=args.postgres_url).resolved_database_url)
    scan = DocumentStore(store.engine)
    index = VectorIndex(Settings().documents_index_max_bytes)
    indexed = DocumentStore(store.engine, index)
    collection = "filled"
    try:
        seconds = fill(args, scan, collection)
        lines.append(f"  filled by COPY, then VACUUM ANALYZE, in {seconds:.1f} s")
        embedder = default_embedder()
        vectors = embedder.embed(list(QUERIES))
        wall = time.perf_counter()
        for _ in range(20):
            embedder.embed([QUERIES[0]])
        lines.append(f"  one query embedded: {(time.perf_counter() - wall) / 20 * 1000:.1f} ms")

        def timed(documents: DocumentStore, i: int) -> float:
            wall = time.perf_counter()
            hits = documents.search(
                QUERIES[i % len(QUERIES)], vectors[i % len(QUERIES)], collection=collection, k=10
            )
            took = time.perf_counter() - wall
            assert len(hits) == 10
            return took

        took = [timed(scan, i) for i in range(args.scan_searches)]
        lines.append("  store search, vectors scanned from the database: " + _ms(took))
        first = timed(indexed, 0)
        lines.append(
            f"  store search with the index, first (loads {args.chunks:,} vectors,"
            f" {index.nbytes / 2**20:.0f} MiB held): {first * 1000:.0f} ms"
        )
        took = [timed(indexed, i) for i in range(args.searches)]
        lines.append("  store search with the index (text + vectors, fusion, rows): " + _ms(took))
        for i, query in enumerate(QUERIES):  # each part alone, on one connection
            with store.engine.connect() as conn:
                text_took, vector_took = [], []
                for _ in range(max(1, args.searches // len(QUERIES))):
                    wall = time.perf_counter()
                    indexed._text_ranking(conn, query, collection)
                    text_took.append(time.perf_counter() - wall)
                    wall = time.perf_counter()
                    indexed._indexed_ranking(conn, vectors[i], collection)
                    vector_took.append(time.perf_counter() - wall)
            lines.append(
                f"    {query!r}: text ranking {_ms(text_took)}; vector ranking {_ms(vector_took)}"
            )
        ids = [h.chunk_id for h in scan.search("", vectors[0], collection=collection, k=10)]
        assert ids == [
            h.chunk_id for h in indexed.search("", vectors[0], collection=collection, k=10)
        ]
        lines.append("  the index's top 10 is the scan's (checked for one query)")
        added, _ = scan.create(
            collection=collection, filename="added.txt", sha256=secrets.token_hex(32), size=0,
            metadata={}, replace=False,
        )  # fmt: skip
        scan.save_chunks(added, [Chunk(n, f"added {n}", 1, 1, 0, 8) for n in range(args.added)])
        scan.save_vectors(
            added.id, list(range(args.added)), vectors[np.arange(args.added) % len(QUERIES)]
        )
        scan.set_status(added.id, "ready", chunk_count=args.added)
        after_add = timed(indexed, 1)
        scan.delete(added.id)
        after_delete = timed(indexed, 2)
        lines.append(
            f"  after another store adds a document of {args.added} chunks, the next search:"
            f" {after_add * 1000:.0f} ms; after it deletes it: {after_delete * 1000:.0f} ms"
        )
        lines.append("  full-text ranking, EXPLAIN ANALYZE:")
        lines.extend(text_plan(args, collection))
    finally:
        store.dispose()

    processes = Processes(log_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        processes.start(
            "api-search", [sys.executable, "-m", "conveyor", "api", "--port", str(port)], env
        )
        wait_for(lambda: _answers(f"{url}/readyz"), timeout=120, what="the API", every=0.2)
        headers = {"Authorization": f"Bearer {env['CONVEYOR_ADMIN_KEY']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            wall = time.perf_counter()
            client.get("/v1/search", params={"q": "warm", "collection": collection})
            first = time.perf_counter() - wall
            took = []
            for i in range(args.searches):
                wall = time.perf_counter()
                response = client.get(
                    "/v1/search",
                    params={"q": QUERIES[i % len(QUERIES)], "collection": collection, "k": 10},
                )
                took.append(time.perf_counter() - wall)
                response.raise_for_status()
        lines.append(f"  GET /v1/search, first (the API loads its index): {first * 1000:.0f} ms")
        lines.append("  GET /v1/search (query embedded in the API, sequential): " + _ms(took))
    finally:
        processes.stop_all()
    return lines


def search_sqlite(args: argparse.Namespace, work: Path) -> list[str]:
    """Part 3's store figures on the embedded store (SQLite, FTS5): no API."""
    lines = [f"4. search with {args.chunks:,} chunks in {args.documents} ready documents (SQLite)"]
    store = Store(Settings(database_url=f"sqlite:///{work / 'search.db'}").resolved_database_url)
    try:
        store.migrate()
        scan = DocumentStore(store.engine)
        indexed = DocumentStore(store.engine, VectorIndex(Settings().documents_index_max_bytes))
        made = [
            scan.create(
                collection="filled", filename=f"filled-{n}.txt", sha256=secrets.token_hex(32),
                size=0, metadata={}, replace=False,
            )[0]
            for n in range(args.documents)
        ]  # fmt: skip
        per_document = -(-args.chunks // args.documents)
        rng = random.Random(7)
        vectors = np.random.default_rng(7).standard_normal((args.chunks, DIMENSION), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        wall = time.perf_counter()
        raw = store.engine.raw_connection()
        try:
            raw.cursor().executemany(
                "INSERT INTO conveyor_document_chunks (document_id, collection, ordinal, text,"
                " page_start, page_end, start_offset, end_offset, embedding)"
                " VALUES (?, ?, ?, ?, 1, 1, 0, 1, ?)",
                (
                    (
                        made[n // per_document].id, "filled", n % per_document,
                        " ".join(prose(rng, 40)), vectors[n].astype("<f4").tobytes(),
                    )
                    for n in range(args.chunks)
                ),
            )  # fmt: skip
            raw.commit()
            plan = raw.cursor().execute(
                "EXPLAIN QUERY PLAN SELECT c.id FROM conveyor_document_chunks_fts f"
                " JOIN conveyor_document_chunks c ON c.id = f.rowid"
                " JOIN conveyor_documents d ON d.id = c.document_id"
                " WHERE conveyor_document_chunks_fts MATCH '\"river\"' AND d.status = 'ready'"
                " ORDER BY bm25(conveyor_document_chunks_fts), c.id LIMIT 50"
            )
            steps = [str(row[3]) for row in plan]
        finally:
            raw.close()
        for n, document in enumerate(made):
            count = len(range(n * per_document, min((n + 1) * per_document, args.chunks)))
            scan.set_status(document.id, "ready", chunk_count=count)
        lines.append(f"  filled in {time.perf_counter() - wall:.1f} s")
        lines.append("  full-text query plan: " + "; ".join(steps))
        targets = default_embedder().embed(list(QUERIES))

        def timed(documents: DocumentStore, i: int) -> float:
            wall = time.perf_counter()
            hits = documents.search(
                QUERIES[i % len(QUERIES)], targets[i % len(QUERIES)], collection="filled", k=10
            )
            assert len(hits) == 10
            return time.perf_counter() - wall

        took = [timed(scan, i) for i in range(args.scan_searches)]
        lines.append("  store search, vectors scanned from the database: " + _ms(took))
        lines.append(f"  store search with the index, first: {timed(indexed, 0) * 1000:.0f} ms")
        took = [timed(indexed, i) for i in range(args.searches)]
        lines.append("  store search with the index: " + _ms(took))
    finally:
        store.dispose()
    return lines


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms)} p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms,"
        f" max {max(ms):.0f} ms"
    )


# -- the run ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/conveyor_bench_documents"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--words-per-page", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--documents", type=int, default=500, help="sharing --chunks")
    parser.add_argument("--searches", type=int, default=100)
    parser.add_argument("--scan-searches", type=int, default=5, help="without the index")
    parser.add_argument("--added", type=int, default=200, help="chunks of the added document")
    parser.add_argument("--force", action="store_true", help="wipe a database in use")
    parser.add_argument("--skip", choices=["stages", "ingest", "search", "sqlite"], action="append")
    args = parser.parse_args()
    check_redis_url(args.redis_url)
    if not args.force:
        check_unused(args.postgres_url, args.redis_url)
    skip = set(args.skip or [])
    print(machine_line(), flush=True)
    recreate_database(args.postgres_url)
    redis.Redis.from_url(args.redis_url).flushdb()
    key = f"cvk_bench_{secrets.token_urlsafe(16)}"
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-documents-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_DATA_DIR=str(work / "data"),
        CONVEYOR_DATABASE_URL=args.postgres_url,
        CONVEYOR_BROKER_URL=args.redis_url,
        CONVEYOR_REDIS_URL=args.redis_url,
        CONVEYOR_EVENT_CHANNEL=f"conveyor:bench:{uuid.uuid4().hex}",
        CONVEYOR_ADMIN_KEY=key,
        CONVEYOR_DOCUMENTS="true",
        CONVEYOR_LOG_LEVEL="WARNING",
        CONVEYOR_API_RATE_LIMIT="1000000/s",
    )
    try:
        store = Store(Settings(database_url=args.postgres_url).resolved_database_url)
        try:
            store.migrate()
        finally:
            store.dispose()
        pdf = make_pdf(work / f"casefile-{args.pages}.pdf", args.pages, args.words_per_page)
        print(f"PDF: {args.pages} pages, {pdf.stat().st_size:,} bytes; logs in {work}", flush=True)
        for name, run in (
            ("stages", lambda: stages(pdf)),
            ("ingest", lambda: ingest(args, pdf, env, work)),
            ("search", lambda: search(args, env, work)),
            ("sqlite", lambda: search_sqlite(args, work)),
        ):
            if name not in skip:
                print("\n".join(run()), flush=True)
                print(machine_line(), flush=True)
    finally:
        drop_database(args.postgres_url)
        redis.Redis.from_url(args.redis_url).flushdb()


if __name__ == "__main__":
    main()
