"""Execution inside Celery worker processes, by concern:

worker/process.py    the worker process: Celery, the sweep, start-up and shutdown
worker/attempt.py    running one attempt: claim, run the task, record its outcome
worker/outcomes.py   what an outcome does to the job: retry, dead letters, take-back
worker/monitor.py    the per-process monitor: heartbeats, stopping cancelled jobs
worker/identity.py   the process's identity in the store; writes that outlast outages
"""
