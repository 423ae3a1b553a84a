"""/v1/pipelines on SQLite: submit, advance (jobs run in-process as a worker runs them),
read, list, cancel, replay a failed step, follow the stream; and every refused definition."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from conveyor import Conveyor
from conveyor.jobs import JobStatus
from tests.e2e.pipeline_app import register, squares
from tests.pipeline_driver import drain

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


@pytest.fixture(autouse=True)
def _pipeline_tasks(conveyor: Conveyor) -> None:
    register(conveyor)


async def submit(client: httpx.AsyncClient, steps: list[dict[str, Any]], **body: Any) -> dict:
    response = await client.post("/v1/pipelines", json={"steps": steps, **body})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/pipelines/{response.json()['id']}"
    pipeline: dict[str, Any] = response.json()
    return pipeline


async def stream(
    client: httpx.AsyncClient, pipeline_id: str, *, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    url = f"/v1/pipelines/{pipeline_id}/events"
    found = []
    async with aconnect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200
        async for message in source.aiter_sse():
            event = json.loads(message.data)
            assert message.id == str(event["id"]) and message.event == event["type"]
            found.append(event)
    return found


def steps_of(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in pipeline["steps"]}


async def test_split_map_sum_report_runs_each_item_once_and_streams_every_step(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(client, squares(20), name="squares")
    assert pipeline["status"] == "running" and pipeline["name"] == "squares"
    first = steps_of(pipeline)
    assert [s["status"] for s in first.values()] == ["running", "pending", "pending", "pending"]
    assert len(first["split"]["jobs"]) == 1 and first["split"]["jobs"][0]["status"] == "queued"

    ran = drain(conveyor)

    runs = Counter((job.step, job.item) for job in ran)
    assert set(runs.values()) == {1}
    assert len(runs) == 1 + 20 + 1 + 1
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    assert done["progress"] == {"done": 23, "total": 23, "percent": 100.0}
    steps = steps_of(done)
    assert [s["status"] for s in steps.values()] == ["succeeded"] * 4
    assert [j["item"] for j in steps["square"]["jobs"]] == list(range(20))
    assert steps["square"]["items"] == steps["square"]["done"] == 20
    report = conveyor.store.get_job(steps["report"]["jobs"][0]["id"])
    assert report.result == {"sum": sum(i * i for i in range(20)), "steps": ["sum"]}
    # A job knows the pipeline, step and item it runs.
    item = (await client.get(f"/v1/jobs/{steps['square']['jobs'][7]['id']}")).json()
    assert (item["pipeline_id"], item["step"], item["item"]) == (pipeline["id"], "square", 7)

    events = await stream(client, pipeline["id"])
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    assert events[0]["type"] == "pipeline" and events[0]["status"] == "running"
    assert events[-1]["type"] == "pipeline" and events[-1]["status"] == "succeeded"
    step_events = [(e["step"], e["status"]) for e in events if e["type"] == "step"]
    for name in ("split", "square", "sum", "report"):
        assert step_events.index((name, "running")) < step_events.index((name, "succeeded"))
    assert Counter(
        e["item"] for e in events if e["step"] == "square" and e["status"] == "succeeded"
    ) == Counter({i: 1 for i in range(20)} | {None: 1})  # each item's job, and the step

    middle = events[len(events) // 2]
    resumed = await stream(client, pipeline["id"], last_event_id=str(middle["id"]))
    assert resumed == [e for e in events if e["id"] > middle["id"]]


async def test_a_step_sees_the_results_of_the_steps_it_runs_after(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(
        client,
        [
            {"name": "a", "task": "pipes.split", "payload": {"n": 2}},
            {"name": "b", "task": "pipes.split", "payload": {"n": 1}},
            {"name": "sq", "task": "pipes.square", "map": "a"},
            {"name": "echo", "task": "pipes.echo", "after": ["b", "sq"]},
        ],
    )
    drain(conveyor)
    echo = steps_of((await client.get(f"/v1/pipelines/{pipeline['id']}")).json())["echo"]
    result = conveyor.store.get_job(echo["jobs"][0]["id"]).result
    assert result == {"b": [{"n": 0, "seconds": 0.0}], "sq": [0, 1]}


async def test_mapping_over_an_empty_list_succeeds_without_jobs(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(client, squares(0))
    drain(conveyor)
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "succeeded"
    steps = steps_of(done)
    assert (steps["square"]["items"], steps["square"]["jobs"]) == (0, [])
    assert conveyor.store.get_job(steps["sum"]["jobs"][0]["id"]).result == 0


async def test_mapping_over_what_is_not_a_list_fails_the_step_and_the_pipeline(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(
        client,
        [
            {"name": "one", "task": "pipes.square", "payload": {"n": 3}},
            {"name": "each", "task": "pipes.square", "map": "one"},
            {"name": "after", "task": "pipes.sum", "after": ["each"]},
        ],
    )
    drain(conveyor)
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "failed"
    steps = steps_of(done)
    assert steps["each"]["status"] == "failed" and steps["each"]["jobs"] == []
    assert steps["each"]["error"] == "cannot map over step 'one': it maps over a number, not a list"
    assert steps["after"]["status"] == "skipped"
    assert steps["after"]["error"] == "step 'each' failed"


async def test_items_the_task_refuses_fail_the_mapped_step(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(
        client,
        [
            {"name": "numbers", "task": "pipes.split", "payload": {"n": 2}},
            {"name": "gates", "task": "pipes.gate", "map": "numbers"},
        ],
    )
    drain(conveyor)
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    gates = steps_of(done)["gates"]
    assert done["status"] == "failed" and gates["jobs"] == []
    assert gates["error"].startswith("cannot map over step 'numbers': item 0: invalid payload")


async def test_more_items_than_allowed_fail_the_mapped_step(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    conveyor.settings.pipeline_max_items = 5
    conveyor.store.map_items = conveyor._map_items
    pipeline = await submit(client, squares(6))
    drain(conveyor)
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "failed"
    assert steps_of(done)["square"]["error"] == (
        "cannot map over step 'split': 6 items; a step may map over at most 5"
    )


async def test_a_dead_step_skips_downstream_the_branch_finishes_and_a_replay_resumes(
    client: httpx.AsyncClient, conveyor: Conveyor, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pipeline = await submit(
        client,
        [
            {"name": "numbers", "task": "pipes.split", "payload": {"n": 3}},
            {
                "name": "gate",
                "task": "pipes.gate",
                "payload": {"path": str(gate)},
                "after": ["numbers"],
            },
            {"name": "square", "task": "pipes.square", "map": "numbers", "after": ["gate"]},
            {"name": "sum", "task": "pipes.sum", "after": ["square"]},
            {"name": "side", "task": "pipes.square", "payload": {"n": 9}, "after": ["numbers"]},
        ],
    )
    first = drain(conveyor)
    failed = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    steps = steps_of(failed)
    assert failed["status"] == "failed"
    assert [steps[n]["status"] for n in ("numbers", "gate", "square", "sum", "side")] == [
        "succeeded",
        "failed",
        "skipped",
        "skipped",
        "succeeded",
    ]
    assert steps["gate"]["error"].startswith("job ") and "is dead" in steps["gate"]["error"]
    assert steps["square"]["jobs"] == [] and steps["sum"]["jobs"] == []
    dead_id = steps["gate"]["jobs"][0]["id"]

    gate.touch()
    replay = await client.post(f"/v1/dead-letters/{dead_id}/replay")
    assert replay.status_code == 202, replay.text
    replayed = replay.json()
    assert (replayed["pipeline_id"], replayed["step"]) == (pipeline["id"], "gate")
    reopened = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert reopened["status"] == "running"
    assert [s["status"] for s in reopened["steps"]] == [
        "succeeded",
        "running",
        "pending",
        "pending",
        "succeeded",
    ]
    second = drain(conveyor)

    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "succeeded"
    assert [j["id"] for j in steps_of(done)["gate"]["jobs"]] == [dead_id, replayed["id"]]
    ran = Counter(job.step for job in first + second if job.status is JobStatus.SUCCEEDED)
    assert ran == Counter({"numbers": 1, "gate": 1, "square": 3, "sum": 1, "side": 1})
    sums = steps_of(done)["sum"]["jobs"]
    assert conveyor.store.get_job(sums[0]["id"]).result == 0 + 1 + 4

    events = await stream(client, pipeline["id"])
    pipeline_statuses = [e["status"] for e in events if e["type"] == "pipeline"]
    assert pipeline_statuses == ["running", "failed", "running", "succeeded"]


async def test_cancelling_cancels_unfinished_steps_and_jobs_and_nothing_starts(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(
        client,
        [
            {"name": "numbers", "task": "pipes.split", "payload": {"n": 3}},
            {"name": "square", "task": "pipes.square", "map": "numbers"},
            {"name": "sum", "task": "pipes.sum", "after": ["square"]},
        ],
    )
    split_job = conveyor.store.get_job(pipeline["steps"][0]["jobs"][0]["id"])
    from tests.pipeline_driver import run_job

    run_job(conveyor, split_job)
    squares_ = steps_of((await client.get(f"/v1/pipelines/{pipeline['id']}")).json())["square"]
    running = squares_["jobs"][0]["id"]
    assert conveyor.store.claim(running, 1, "test-worker") is not None

    response = await client.post(f"/v1/pipelines/{pipeline['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    steps = steps_of(cancelled)
    assert [s["status"] for s in steps.values()] == ["succeeded", "cancelled", "cancelled"]
    assert {j["status"] for j in steps["square"]["jobs"]} == {"cancelled"}
    assert conveyor.store.attempts(running)[0].outcome.value == "cancelled"
    # The running item finishing changes nothing, and nothing downstream starts.
    assert conveyor.store.succeed_step(running, 1, 0, pipeline_id=pipeline["id"]) is None
    assert drain(conveyor) == []
    assert (
        steps_of((await client.get(f"/v1/pipelines/{pipeline['id']}")).json())["sum"]["jobs"] == []
    )

    again = await client.post(f"/v1/pipelines/{pipeline['id']}/cancel")
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    assert "has ended: it is cancelled" in again.json()["detail"]
    events = await stream(client, pipeline["id"])
    assert (events[-1]["type"], events[-1]["status"]) == ("pipeline", "cancelled")


async def test_cancelling_one_job_of_a_step_cancels_the_step(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    pipeline = await submit(client, squares(2))
    split_id = pipeline["steps"][0]["jobs"][0]["id"]
    assert (await client.post(f"/v1/jobs/{split_id}/cancel")).status_code == 200
    done = (await client.get(f"/v1/pipelines/{pipeline['id']}")).json()
    assert done["status"] == "cancelled"
    assert [s["status"] for s in done["steps"]] == ["cancelled", "skipped", "skipped", "skipped"]


async def test_unknown_pipelines_are_404(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/pipelines/nope"),
        ("POST", "/v1/pipelines/nope/cancel"),
        ("GET", "/v1/pipelines/nope/events"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["type"] == "urn:conveyor:problem:pipeline-not-found"


@pytest.mark.parametrize(
    ("steps", "loc", "detail"),
    [
        (
            [
                {"name": "a", "task": "pipes.sum", "after": ["c"]},
                {"name": "b", "task": "pipes.sum", "after": ["a"]},
                {"name": "c", "task": "pipes.sum", "after": ["b"]},
            ],
            ["body", "steps", 0, "after"],
            "step 'a': the steps form a cycle: 'a' -> 'b' -> 'c' -> 'a'",
        ),
        (
            [{"name": "a", "task": "pipes.sum", "after": ["a"]}],
            ["body", "steps", 0, "after"],
            "the steps form a cycle: 'a' -> 'a'",
        ),
        (
            [{"name": "a", "task": "pipes.sum", "after": ["ghost"]}],
            ["body", "steps", 0, "after"],
            "step 'a': runs after 'ghost', which is no step of this pipeline",
        ),
        (
            [{"name": "a", "task": "pipes.square", "map": "ghost"}],
            ["body", "steps", 0, "map"],
            "step 'a': maps over 'ghost', which is no step of this pipeline",
        ),
        (
            [{"name": "a", "task": "pipes.sum"}, {"name": "a", "task": "pipes.sum"}],
            ["body", "steps", 1, "name"],
            "two steps are named 'a' (steps 0 and 1)",
        ),
        (
            [
                {"name": "a", "task": "pipes.split", "payload": {"n": 1}},
                {"name": "b", "task": "pipes.square", "map": "a", "payload": {"n": 1}},
            ],
            ["body", "steps", 1, "payload"],
            "a mapped step takes each item as its payload",
        ),
        (
            [{"name": "a", "task": "no.such.task"}],
            ["body", "steps", 0, "task"],
            "step 'a': unknown task 'no.such.task'",
        ),
        (
            [{"name": "a", "task": "pipes.split", "payload": {"n": "many"}}],
            ["body", "steps", 0, "payload", "n"],
            "step 'a': invalid payload for 'pipes.split'",
        ),
        (
            [{"name": "a", "task": "pipes.split"}],
            ["body", "steps", 0, "payload", "n"],
            "field required",
        ),
        (
            [{"name": "a", "task": "pipes.split", "payload": {"n": 1, "x": "\u0000"}}],
            ["body", "steps", 0, "payload", "x"],
            "step 'a': the payload cannot be stored as it is",
        ),
    ],
    ids=[
        "cycle",
        "self",
        "unknown-after",
        "unknown-map",
        "duplicate",
        "mapped-payload",
        "unknown-task",
        "bad-payload",
        "missing-payload",
        "unstorable-payload",
    ],
)
async def test_a_refused_definition_is_422_naming_the_step_and_records_nothing(
    client: httpx.AsyncClient,
    conveyor: Conveyor,
    steps: list[dict[str, Any]],
    loc: list[Any],
    detail: str,
) -> None:
    response = await client.post("/v1/pipelines", json={"steps": steps})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:invalid-pipeline"
    assert detail.lower() in problem["detail"].lower()
    assert problem["errors"][0]["loc"] == loc
    assert (await client.get("/v1/pipelines")).json()["items"] == []
    assert conveyor.store.list_jobs() == ([], None)


async def test_more_steps_than_allowed_is_422(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    conveyor.settings.pipeline_max_steps = 3
    steps = [{"name": f"s{i}", "task": "pipes.sum"} for i in range(4)]
    response = await client.post("/v1/pipelines", json={"steps": steps})
    assert response.status_code == 422
    assert response.json()["detail"] == "invalid pipeline: 4 steps; a pipeline may have at most 3"
    assert response.json()["errors"][0]["loc"] == ["body", "steps"]


async def test_an_idempotency_key_makes_one_pipeline(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    body = {"steps": squares(3)}
    headers = {"Idempotency-Key": "pipe-1"}
    first = await client.post("/v1/pipelines", json=body, headers=headers)
    again = await client.post("/v1/pipelines", json=body, headers=headers)
    other = await client.post("/v1/pipelines", json={"steps": squares(4)}, headers=headers)

    assert first.status_code == 202
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422
    assert other.json()["type"] == "urn:conveyor:problem:idempotency-mismatch"
    assert len(conveyor.store.list_jobs()[0]) == 1


async def test_pipelines_are_listed_newest_first_a_page_at_a_time(
    client: httpx.AsyncClient,
) -> None:
    made = [(await submit(client, squares(1), name=f"p{i}"))["id"] for i in range(3)]
    first = (await client.get("/v1/pipelines", params={"limit": 2})).json()
    assert [p["id"] for p in first["items"]] == made[::-1][:2]
    assert all(s["jobs"] == [] for p in first["items"] for s in p["steps"])
    rest = (
        await client.get("/v1/pipelines", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [p["id"] for p in rest["items"]] == [made[0]] and rest["next_cursor"] is None
    running = (await client.get("/v1/pipelines", params={"status": "succeeded"})).json()
    assert running["items"] == []


async def test_python_flow_builder_submits_the_same_pipeline(conveyor: Conveyor) -> None:
    from conveyor.pipelines import Flow

    flow = Flow("built")
    numbers = flow.step("split", "pipes.split", {"n": 4})
    squared = flow.step("square", conveyor.tasks["pipes.square"], map=numbers)
    flow.step("sum", "pipes.sum", after=[squared], priority=9)
    pipeline = conveyor.pipeline(flow, idempotency_key="built-1")
    assert conveyor.pipeline(flow, idempotency_key="built-1").id == pipeline.id
    drain(conveyor)
    done = conveyor.store.get_pipeline(pipeline.id)
    assert done.status.value == "succeeded" and done.name == "built"
    total = conveyor.store.get_job(done.steps[2].jobs[0].id)
    assert (total.result, total.priority) == (0 + 1 + 4 + 9, 9)
