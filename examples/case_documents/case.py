"""File documents into a case and search it, over Conveyor's HTTP API.

    python -m examples.case_documents.case CASE FILE... [--search QUERY]

Each file is uploaded into the collection named after the case, and its ingestion is
followed live on the document's event stream (Server-Sent Events): extracting,
chunking, embedding, indexing, with their progress. Then the case is searched. The
API is ``CONVEYOR_API_URL`` (default http://127.0.0.1:8000), with ``CONVEYOR_API_KEY``
or the admin key that ``conveyor up`` keeps in the data directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from conveyor import Settings

#: Seconds to wait for the API: ``conveyor up`` may still be starting.
READY_TIMEOUT = 120.0


def api_key(settings: Settings) -> str:
    for secret in (settings.api_key, settings.admin_key):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    return settings.admin_key_path.read_text().strip()


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the API at {client.base_url} is not up after {READY_TIMEOUT:.0f}s")
        time.sleep(0.2)


def upload(client: httpx.Client, case: str, path: Path) -> str:
    with path.open("rb") as file:
        response = client.post(
            "/v1/documents", files={"file": (path.name, file)}, data={"collection": case}
        )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    if body.get("duplicate"):
        print(f"{path.name}: already in the case")
    return str(body["document_id"])


def follow(client: httpx.Client, name: str, document_id: str) -> None:
    """Print the document's pipeline as it runs; returns when the pipeline ends."""
    timeout = httpx.Timeout(10.0, read=60.0)
    path = f"/v1/documents/{document_id}/events"
    with connect_sse(client, "GET", path, timeout=timeout) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            if not sse.data:
                continue
            event = json.loads(sse.data)
            data = event.get("data") or {}
            if event["type"] == "pipeline" and event["status"] != "running":
                print(f"{name}: {event['status']}")
                return
            if event["type"] == "step":
                print(f"{name}: {event['step']} {event['status']}")
            elif event["type"] == "progress" and data.get("percent") is not None:
                message = data.get("message") or ""
                print(f"{name}:   {event.get('step')} {float(data['percent']):.0f}% {message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", help="the case: the collection its documents go into")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--search", help="then search the case for this")
    args = parser.parse_args(argv)
    settings = Settings()
    failed = 0
    with httpx.Client(base_url=settings.api_url, timeout=30) as client:
        wait_ready(client)  # before reading the key: a starting `conveyor up` writes it
        client.headers["Authorization"] = f"Bearer {api_key(settings)}"
        for path in args.files:
            document_id = upload(client, args.case, path)
            follow(client, path.name, document_id)
            document = client.get(f"/v1/documents/{document_id}").json()
            print(f"{path.name}: {document['status']}, {document['chunks']} chunks")
            failed += document["status"] != "ready"
        if args.search:
            found = client.get("/v1/search", params={"q": args.search, "collection": args.case})
            found.raise_for_status()
            for hit in found.json()["results"]:
                text = " ".join(hit["text"].split())[:120]
                print(f"{hit['score']:.4f}  {hit['filename']}  p.{hit['page_start']}  {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
