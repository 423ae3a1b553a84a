"""Scheduled AI tasks: prompts sent to an OpenAI-compatible chat-completions endpoint
as jobs, switched on by ``CONVEYOR_AI_TASKS``.

Built only from Conveyor's public face (``app.task``, ``app.queue``, ``app.breaker``,
schedules, ``submit``, and ``notify`` from the notifications workload)::

    prompts.py    the prompt: a Jinja2 template, rendered in a sandbox
    client.py     one chat-completions call, and what its answer means (retry, refuse)
    book.py       AI task definitions and the tokens each job used, in Conveyor's database
    workload.py   the task ``conveyor.ai.complete``, ``install(app)``, define / remove / run

Its HTTP face, ``/v1/ai-tasks``, is ``conveyor.api.ai_tasks``.
"""
