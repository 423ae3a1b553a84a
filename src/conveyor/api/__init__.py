"""Conveyor's HTTP API (FastAPI); build one with :func:`conveyor.api.app.create_app`.

app          create_app, the ASGI factory, the lifespan
jobs         /v1/jobs: submit, list, get, cancel, delete
events       /v1/jobs/{id}/events and /v1/events: server-sent event streams
tasks        /v1/tasks: the registry and payload schemas
health       /healthz, /readyz, /metrics
auth         bearer keys and the bootstrap admin key
problems     errors as RFC 9457 problem details, mapped in one place
middleware   request ids, the body limit, request timing
pages        list responses bounded in items and in bytes
server       the server's protocol: dropping clients that stop reading
"""
