"""Conveyor's HTTP API (FastAPI); build one with :func:`conveyor.api.app.create_app`.

app          create_app, the ASGI factory, the lifespan
jobs         /v1/jobs: submit, list, get, cancel, delete
events       /v1/jobs/{id}/events and /v1/events: server-sent event streams
tasks        /v1/tasks: the registry and payload schemas
workers      /v1/workers: worker processes, their jobs and heartbeats
health       /healthz, /readyz, /metrics
auth         bearer keys, checked before any body is read; scopes and ownership per route
keys         /v1/keys: create, list and revoke API keys
audit        /v1/audit: the trail of changes, and the helpers routes write it with
problems     errors as RFC 9457 problem details, mapped in one place
middleware   request ids, methods (HEAD, 405, slash redirects), header and body limits,
             timing
ratelimit    per-key request budgets (GCRA, in Redis or in process): 429, RateLimit headers
openapi      the document made to say what the API accepts and answers
docs         /docs and /redoc, with their assets served here
pages        list responses bounded in items and in bytes
server       the server's protocol: dropping clients that stop reading
dashboard/   /ui: the web dashboard, pages over these same routes with a session cookie
"""
