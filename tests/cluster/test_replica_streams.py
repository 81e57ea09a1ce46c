"""A Ray replica's streams (``ReplicaStreams``, everything of a replica but Serve's calls), on
a real engine whose steps are slowed: each request's status reaches the ingress's copy of
it, through the same :class:`Accumulator`, also while a prompt is prefilled before its first
token and while a preempted request streams nothing."""

from __future__ import annotations

import asyncio
import json
import pickle
import queue
from pathlib import Path

import pytest

from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.cluster.replica import ReplicaStreams
from auto_glm.cluster.streamed import Accumulator, StreamedEngineClient, describe_engine
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.sampling_params import SamplingParams, StructuredOutput
from tests.serving.conftest import TINY_KV
from tests.serving.slow_engine import slow_engine
from tests.vision_reference import chat_ids, make_image


def _serve(engine, prompts: dict[str, list[int]], max_tokens: int) -> tuple[list, dict]:
    """Stream every prompt at once through one ReplicaStreams, each into an Accumulator as
    the ingress does: the log of (name, chunk kind, status here, has a token yet) after
    each chunk, in arrival order, and each request here."""
    streams = ReplicaStreams(engine, "replica-1")
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    here = {name: Request(name, ids, params) for name, ids in prompts.items()}
    log: list[tuple[str, str, RequestStatus, bool]] = []

    async def one(name: str) -> None:
        request, output = here[name], Accumulator(here[name])
        payload = {
            "request_id": name,
            "prompt": prompts[name],
            "params": params,
            "priority": 0,
            "cache_salt": None,
            "tenant": None,
            "weight": 1.0,
        }
        async for chunk in streams.generate(payload):
            assert "error" not in chunk, chunk
            if "status" in chunk:
                output.status_is(chunk["status"])
                kind = "status"
            else:
                update = output.add(chunk)
                kind = "finished" if update.finished else "tokens"
                if update.finished:
                    request.status = RequestStatus.FINISHED
            log.append((name, kind, request.status, bool(request.output_token_ids)))

    async def everything() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(name) for name in prompts)), timeout=60)

    try:
        asyncio.run(everything())
    finally:
        engine.shutdown()
    return log, here


def test_a_prompt_prefilled_in_a_replica_runs_at_the_ingress_before_its_first_token(
    tiny_checkpoint: Path,
) -> None:
    """A's 64-token prompt is prefilled in 4 chunks of 16 (0.2 s each), B waits behind it
    (one at a time): A is running at the ingress before its first token, B only after A."""
    engine = slow_engine(
        str(tiny_checkpoint), 0.2, kv_cache_memory=TINY_KV, max_num_seqs=1,
        max_num_batched_tokens=16,
    )  # fmt: skip
    log, here = _serve(engine, {"a": list(range(1, 65)), "b": [1, 2, 3]}, max_tokens=2)
    assert log[0] == ("a", "status", RequestStatus.RUNNING, False), log
    a_done = log.index(next(e for e in log if e[:2] == ("a", "finished")))
    b_running = log.index(("b", "status", RequestStatus.RUNNING, False))
    assert b_running > a_done, log
    assert [len(r.output_token_ids) for r in here.values()] == [2, 2]


def test_a_request_preempted_in_a_replica_waits_at_the_ingress(tiny_checkpoint: Path) -> None:
    """Two requests that need 8 blocks of 4 tokens between them share 6 (the tiny model's
    K/V take 512 bytes a token): one is preempted, preempted at the ingress too, after some
    tokens, and then running again until it ends with all its tokens."""
    engine = slow_engine(
        str(tiny_checkpoint), 0.05, kv_cache_memory=6 * 4 * 512, block_size=4,
        max_num_seqs=2, enable_prefix_caching=False,
    )  # fmt: skip
    log, here = _serve(engine, {"a": [1, 2, 3, 4], "b": [100, 101, 102, 103]}, max_tokens=12)
    preempted = [e for e in log if e[2] is RequestStatus.PREEMPTED]
    assert preempted and all(has_token for *_, has_token in preempted), log
    name = preempted[0][0]
    after = log[log.index(preempted[0]) :]
    assert (name, "status", RequestStatus.RUNNING, True) in after, log
    assert [len(r.output_token_ids) for r in here.values()] == [12, 12]


def test_a_request_ended_for_its_schema_crosses_to_the_ingress_with_its_code(
    tiny_checkpoint: Path,
) -> None:
    """A schema whose grammar gives up at the first token: the replica's error chunk says
    the request was at fault and names the code, so the ingress answers 400 invalid_schema
    (it was a 500, "replica replica-1: ...")."""
    engine = slow_engine(str(tiny_checkpoint), 0.0, kv_cache_memory=TINY_KV)
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    params = SamplingParams(
        max_tokens=4, structured_output=StructuredOutput("json_schema", json.dumps(endless))
    )
    payload = {
        "request_id": "x",
        "prompt": [1, 2, 3],
        "params": params,
        "priority": 0,
        "cache_salt": None,
        "tenant": None,
        "weight": 1.0,
    }

    async def chunks() -> list[dict]:
        streams = ReplicaStreams(engine, "replica-1")
        return [c async for c in streams.generate(payload) if "status" not in c]

    try:
        got = asyncio.run(asyncio.wait_for(chunks(), timeout=60))
    finally:
        engine.shutdown()
    error = got[-1]
    assert (error["replica"], error["invalid"], error["code"]) == (
        "replica-1",
        True,
        "invalid_schema",
    )
    assert error["error"].startswith("structured output failed: its grammar rejected token")


def _payload(name: str, prompt, params: SamplingParams) -> dict:
    return {
        "request_id": name,
        "prompt": prompt,
        "params": params,
        "priority": 0,
        "cache_salt": None,
        "tenant": None,
        "weight": 1.0,
    }


def test_images_prepared_at_the_ingress_are_answered_by_the_replica_as_in_process(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A vision model's images are preprocessed in the ingress (the front end's
    StreamedEngineClient) and cross to the replica as tensors, pickled as Ray sends them;
    the replica's greedy tokens are those of the same images given to its engine in
    process. The ingress used to refuse every image, "use a vision model", to GLM-4.1V."""
    path = build_random_vision_checkpoint(tmp_path / "glm4v", seed=2)
    engine = slow_engine(str(path), 0.0, kv_cache_memory=TINY_KV)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokenizer = engine.tokenizer
    prompts = [
        (chat_ids(tokenizer, 1, "What is it?"), [make_image(48, 40, 3)]),
        (chat_ids(tokenizer, 2, "Which differs?"), [make_image(24, 32, 4), make_image(32, 24, 5)]),
    ]
    try:
        front = StreamedEngineClient(describe_engine(engine))
        assert front.accepts_images
        sent = [pickle.loads(pickle.dumps(front.prepare(*p))) for p in prompts]
        ids, images = front.checked_input(sent[1])
        assert len(images) == 2 and len(ids) > len(prompts[1][0]) + 2  # placeholders grown

        async def replica(i: int) -> list[int]:
            streams = ReplicaStreams(engine, "replica-1")
            output = Accumulator(Request(f"r{i}", sent[i].token_ids, params))
            async for chunk in streams.generate(_payload(f"r{i}", sent[i], params)):
                if "status" not in chunk:
                    update = output.add(chunk)
            return update.outputs.token_ids

        async def both() -> list[list[int]]:
            return await asyncio.gather(replica(0), replica(1))

        got = asyncio.run(asyncio.wait_for(both(), timeout=120))
        done: queue.Queue = queue.Queue()
        for p in prompts:  # one at a time: the replica ran them in one batch
            engine.submit(engine.prepare(*p), params, lambda o: o.finished and done.put(o))
            assert got.pop(0) == done.get(timeout=60).outputs.token_ids
        with pytest.raises(ValueError, match="more image placeholder tokens than the 0"):
            front.checked_input(sent[0].token_ids)  # the image's placeholders without it
    finally:
        engine.shutdown()
    text_only = slow_engine(str(tiny_checkpoint), 0.0, kv_cache_memory=TINY_KV)
    try:
        front = StreamedEngineClient(describe_engine(text_only))
        assert not front.accepts_images
        with pytest.raises(ValueError, match="does not accept images"):
            front.prepare([1, 2, 3], [make_image(16, 16, 1)])
    finally:
        text_only.shutdown()
