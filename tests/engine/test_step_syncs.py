"""A step waits for the device once: for its tokens' copy back, an event
(:meth:`LaunchedStep.result`). Nothing else in it reads a device value on the host or copies
to the device with a blocking copy, which would hold the host until the step in flight has
run, and so would undo the steps planned ahead.

The workload mixes greedy rows, seeded and unseeded top-k/top-p/min-p, logprobs,
``logit_bias``, penalties and a JSON schema, with steps planned ahead (the penalized and the
structured requests' among them: penalties count the token in flight on the device, and a
grammar row's step samples once it is appended), prompt chunks among them.

- On the CPU (Triton's interpreter, the padded decode path that a GPU replays from CUDA
  graphs, the sampler set as on a GPU) nothing ever waits, so a dispatch mode records what
  each step's device work calls (the padded decode path, every forward pass, the logits and
  the sampling), and the test refuses the ops that make a CUDA device's host wait
  (``.item()``, a truth value, ``nonzero`` and boolean masks). It cannot see copies. So too
  on GLM-4.1V, with images (the vision tower, M-RoPE positions).
- On a CUDA GPU torch's sync debug mode flags every synchronizing call of every step, copies
  included, on the Triton backend and on FlashInfer's (where the ``gpu`` extra is installed).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from auto_glm import GLMModel, SamplingParams
from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.engine.outputs import RequestOutput
from auto_glm.platforms import pinned, tensor_on, to_device
from tests.engine.jobs import finals
from tests.engine.test_cuda_graphs import padded_model
from tests.reference import random_prompts
from tests.schemas import PERSON
from tests.triton_env import require_triton_interpreter
from tests.vision_reference import mixed_batch

# ops whose CUDA kernels make the host wait for the device: they hand a value, or a
# data-dependent size, back to the host
WAITING_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), int(t), float(t)
        "aten::item",  # the same, as inference mode dispatches it
        "aten::is_nonzero",  # bool(t), `if t:`
        "aten::nonzero",  # also torch.where(cond) with one argument
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
        "aten::bincount",
        "aten::equal",
    }
)
# ops that take a boolean mask as an index, which they turn into positions with nonzero
MASK_INDEXED_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)


def _waits(func, args) -> str | None:
    """Why ``func(*args)`` would make a CUDA device's host wait, or None."""
    name = func._schema.name
    if name in WAITING_OPS:
        return name
    if name in MASK_INDEXED_OPS:
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if masks:
            return f"{name} with a boolean mask"
    return None


class _WaitRecorder(TorchDispatchMode):
    """Records the ops called under it that would wait on a CUDA device."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reason = _waits(func, args)
        if reason is not None:
            self.found.append(reason)
        return func(*args, **(kwargs or {}))


@contextmanager
def _cuda_syncs(found: list[str]) -> Iterator[None]:
    """Records the synchronizing CUDA calls made on this thread under it (torch's sync debug
    mode: blocking copies, reads of a device value, stream and device synchronizations;
    not an event's wait)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def _jobs(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """Seven requests of 10 tokens, one per kind of sampling; the penalized one, then the
    structured one, last."""
    prompts = random_prompts(vocab, [3, 9, 5, 14, 7, 4, 6], seed=31)
    rest = {"max_tokens": 10, "ignore_eos": True}
    params = [
        SamplingParams(temperature=0, **rest),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=7, **rest),
        SamplingParams(temperature=0.8, top_p=0.9, **rest),  # unseeded, no top-k
        SamplingParams(temperature=0, logprobs=3, **rest),
        SamplingParams(temperature=0, logit_bias={5: 2.0, 9: -3.0}, **rest),
        SamplingParams(
            temperature=0.7,
            seed=3,
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=0.2,
            **rest,
        ),
        SamplingParams(temperature=0, structured_output=PERSON, **rest),  # longer than 10
    ]
    return list(zip(prompts, params, strict=True))


def _run_jobs(model: GLMModel) -> list[RequestOutput]:
    """The jobs of :func:`_jobs`, submitted at once; their final outputs, in order."""
    return finals(model, _jobs(model.engine.loaded.model.spec.vocab_size))


Recorder = Callable[[list[str]], object]  # a context manager that appends what waited


def _watch_steps(model: GLMModel, record: Recorder) -> list[tuple]:
    """From now on, per step launched: (planned ahead, its requests, whether it prefills,
    what waited in its launch, its sampling held back if it was, and its read-back)."""
    runner = model.engine.core.runner
    steps: list[tuple] = []
    launch = runner.launch

    def watched(plan, feed=None):
        found: list[str] = []
        with record(found):
            step = launch(plan, feed)
        read = step.result

        def result():
            with record(found):
                return read()

        step.result = result
        sample = step.sample_deferred

        def sample_deferred():
            with record(found):
                sample()

        step.sample_deferred = sample_deferred
        ids = [r.request_id for r in plan.requests]
        steps.append((plan.feeds_pending, ids, max(plan.num_scheduled_tokens) > 1, found))
        return step

    runner.launch = watched
    return steps


def _check(steps: list[tuple], outputs: list[RequestOutput]) -> None:
    """Every request ran to its length; steps were planned ahead, the penalized and the
    structured requests' among them, prefill chunks were among the steps watched, and no
    watched step waited."""
    assert [len(r.outputs.token_ids) for r in outputs] == [10] * 7
    kinds = {outputs[-2].request_id: "penalties", outputs[-1].request_id: "a grammar"}
    for request_id, kind in kinds.items():
        assert any(ahead and request_id in ids for ahead, ids, _, _ in steps), (
            f"no step planned ahead sampled with {kind}"
        )
    assert any(prefill for _, _, prefill, _ in steps), "no step with prefill chunks"
    assert any(ahead and prefill for ahead, _, prefill, _ in steps), (
        "no step planned ahead fed prompt chunks"
    )
    waited = [(ahead, prefill, found) for ahead, _, prefill, found in steps if found]
    assert not waited, waited


def test_the_recorder_sees_a_read_of_a_value_and_a_boolean_mask() -> None:
    found: list[str] = []
    x = torch.arange(4.0)
    with _WaitRecorder(found):
        _ = x.sum().item()
        _ = x[x > 1.0]
        _ = x.index_select(0, torch.tensor([0, 2]))  # a gather by positions waits for nothing
        with torch.inference_mode():  # the engine's steps run in it
            _ = int(x.max())
    assert found == ["aten::_local_scalar_dense", "aten::index with a boolean mask", "aten::item"]


def test_host_values_stay_where_they_are_on_the_cpu() -> None:
    host = torch.arange(3)
    assert to_device(host, "cpu") is host and pinned(host, torch.device("cpu")) is host
    values = tensor_on([4, 5], torch.int32, torch.device("cpu"))
    assert values.dtype == torch.int32 and values.tolist() == [4, 5]


def _record_calls(found: list[str], *methods: tuple[object, str]) -> None:
    """From now on, record in ``found`` what waits under each ``(object, method name)``; a
    call made within another is recorded once."""
    active: list[bool] = []
    for owner, name in methods:
        call = getattr(owner, name)

        def recorded(*args, _call=call, **kwargs):
            if active:
                return _call(*args, **kwargs)
            active.append(True)
            try:
                with _WaitRecorder(found):
                    return _call(*args, **kwargs)
            finally:
                active.pop()

        setattr(owner, name, recorded)


def _watch_device_work(model: GLMModel) -> list[tuple]:
    """:func:`_watch_steps` recording the ops that would wait on a GPU in each step's device
    work (padded decode steps, every forward pass, the images' encoding, logits and
    sampling), with the engine stepping as on a GPU: steps planned ahead, and the sampler
    with no fit check on the host and its argmax in the logits' dtype."""
    model.engine.core.overlap_steps = True
    runner = model.engine.core.runner
    runner.sampler.sync_free = runner.sampler.native_argmax = True
    recorded: list[str] = []
    device_work = [(runner.decode_graphs, "run"), (runner.model, "forward")]
    device_work += [(runner.model, "compute_logits"), (runner.sampler, "sample")]
    if runner.model.accepts_images:
        device_work.append((runner.model, "encode_images"))
    _record_calls(recorded, *device_work)

    @contextmanager
    def record(found: list[str]) -> Iterator[None]:
        start = len(recorded)
        yield
        found += recorded[start:]

    return _watch_steps(model, record)


def test_a_step_on_the_cpu_calls_nothing_that_would_wait_on_a_gpu(path) -> None:
    require_triton_interpreter()
    with padded_model(path, max_num_seqs=8, max_num_batched_tokens=16) as model:
        steps = _watch_device_work(model)
        outputs = _run_jobs(model)
    _check(steps, outputs)


def _run_with_images(model: GLMModel) -> list[RequestOutput]:
    """Three greedy GLM-4.1V requests, two with images, submitted at once; their final
    outputs."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    return finals(model, [(item, greedy) for item in mixed_batch(model)])


def _check_with_images(steps: list[tuple], outputs: list[RequestOutput]) -> None:
    """:func:`_check` for :func:`_run_with_images`."""
    assert [len(r.outputs.token_ids) for r in outputs] == [10, 10, 10]
    assert any(ahead for ahead, _, _, _ in steps), "no step was planned ahead"
    assert any(prefill for _, _, prefill, _ in steps), "no step with prefill chunks"
    assert any(ahead and prefill for ahead, _, prefill, _ in steps), (
        "no step planned ahead fed prompt chunks"
    )
    waited = [(ahead, prefill, found) for ahead, _, prefill, found in steps if found]
    assert not waited, waited


VISION_OPTIONS = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "attention_backend": "triton"}


def test_a_multimodal_step_on_the_cpu_calls_nothing_that_would_wait_on_a_gpu(
    tmp_path,
) -> None:
    """GLM-4.1V: prefill chunks with images (the vision tower, M-RoPE positions) and decode
    steps after them."""
    require_triton_interpreter()
    checkpoint = build_random_vision_checkpoint(tmp_path, seed=2)
    options = VISION_OPTIONS | {"cuda_graphs": True}
    with GLMModel(str(checkpoint), device="cpu", dtype="float32", **options) as model:
        steps = _watch_device_work(model)
        outputs = _run_with_images(model)
    _check_with_images(steps, outputs)


BACKENDS = [
    "triton",
    pytest.param(
        "flashinfer",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("flashinfer") is None,
            reason="needs FlashInfer: pip install 'open-autoglm[gpu]'",
        ),
    ),
]


def test_host_values_go_to_a_gpu_without_a_wait_where_torch_tensor_waits() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    blocking: list[str] = []
    with _cuda_syncs(blocking):
        torch.tensor([1, 2, 3], device="cuda")  # from pageable memory: a blocking copy
    assert len(blocking) == 1, blocking
    found: list[str] = []
    with _cuda_syncs(found):
        values = tensor_on([1, 2, 3], torch.int32, torch.device("cuda"))
        host = pinned(torch.arange(3), torch.device("cuda"))
    assert found == [] and host.is_pinned()
    assert values.device.type == "cuda" and values.tolist() == [1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_step_on_a_gpu_waits_for_the_device_but_to_read_its_tokens(
    make_checkpoint, backend: str
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    checkpoint = make_checkpoint("Qwen3ForCausalLM", seed=2, head_dim=128, num_key_value_heads=2)
    options = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 32,
        "max_model_len": 64,
        "kv_cache_memory": 64 << 20,
        "attention_backend": backend,
    }
    with GLMModel(str(checkpoint), device="cuda", dtype="bfloat16", **options) as model:
        assert model.engine.core.runner.attention_backend.name == backend
        assert model.engine.core.overlap_steps
        steps = _watch_steps(model, _cuda_syncs)
        outputs = _run_jobs(model)
    _check(steps, outputs)


def test_no_multimodal_step_on_a_gpu_waits_for_the_device_but_to_read_its_tokens(
    tmp_path,
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    checkpoint = build_random_vision_checkpoint(tmp_path, seed=2)
    with GLMModel(str(checkpoint), device="cuda", dtype="bfloat16", **VISION_OPTIONS) as model:
        assert model.engine.core.overlap_steps
        steps = _watch_steps(model, _cuda_syncs)
        outputs = _run_with_images(model)
    _check_with_images(steps, outputs)
