"""The engine on a tiny GLM-4.1V: greedy output against transformers with images, batching
of different image sizes, chunked prefill cutting through an image, the prefix cache with
images, preemption, and the input checks of EngineClient.prepare/submit."""

from __future__ import annotations

import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.engine.inputs import EngineInput
from auto_glm.engine.outputs import RequestOutput
from tests.engine.jobs import finals
from tests.triton_env import require_triton_interpreter
from tests.vision_reference import chat_ids, hf_greedy, load_reference, make_image, mixed_batch

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LONG_TEXT = (
    "Look at the picture carefully and then tell me, in a few words, which colours you "
    "see, where the light comes from and what might have happened just before it was taken."
)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_random_vision_checkpoint(tmp_path_factory.mktemp("glm4v"), seed=2)


@pytest.fixture(scope="module")
def reference(path):
    return load_reference(path)


def _model(path, **options) -> GLMModel:
    return GLMModel(str(path), device="cpu", dtype="float32", **options)


def _run(
    model: GLMModel, inputs: list[EngineInput], params: SamplingParams = GREEDY
) -> list[RequestOutput]:
    """Submit all at once (one batch) and wait for every final output, in input order."""
    return finals(model, [(item, params) for item in inputs])


def _tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [out.outputs.token_ids for out in outputs]


def test_greedy_matches_transformers_in_one_batch(path, reference):
    """One image, two images, a text-only prompt; images of three sizes share a batch."""
    with _model(path) as model:
        inputs = mixed_batch(model)
        assert [im.num_tokens for im in inputs[0].images + inputs[1].images] == [12, 10, 36]
        assert _tokens(_run(model, inputs)) == hf_greedy(reference, inputs, GREEDY.max_tokens)


def test_decodes_after_images_take_the_padded_path_at_their_mrope_positions(path, reference):
    """The padded decode path that a GPU replays from CUDA graphs (run eagerly here), steps
    planned ahead included: a request after images is fed at its M-RoPE position, below its
    index, and the greedy tokens are transformers'."""
    require_triton_interpreter()
    with _model(path, attention_backend="triton", cuda_graphs=True, max_num_seqs=4) as model:
        model.engine.core.overlap_steps = True  # as on a GPU, where it is the default
        graphs = model.engine.core.runner.decode_graphs
        assert graphs is not None
        steps = []  # per padded step: planned ahead, then (index, position) per request
        run = graphs.run

        def recorded(plan, fed=None):
            logits = run(plan, fed)
            fed_at = graphs.positions[: len(plan.requests)].tolist()
            steps.append((fed is not None, list(zip(plan.start_positions, fed_at, strict=True))))
            return logits

        graphs.run = recorded
        inputs = mixed_batch(model)
        outputs = _run(model, inputs)
    assert _tokens(outputs) == hf_greedy(reference, inputs, GREEDY.max_tokens)
    assert any(ahead for ahead, _ in steps), "no decode step was planned ahead"
    fed = {pair for _, pairs in steps for pair in pairs}
    assert any(position < index for index, position in fed)  # after images
    assert any(position == index for index, position in fed)  # the text-only prompt


def test_chunked_prefill_cuts_through_an_image(path, reference):
    budget = 8
    with _model(path, max_num_batched_tokens=budget) as model:
        item = model.engine.prepare(
            chat_ids(model.tokenizer, 2, LONG_TEXT), [make_image(48, 40, 3), make_image(24, 32, 4)]
        )
        image_id = model.engine.loaded.model.image_token_id
        first = item.token_ids.index(image_id)
        # the image's placeholders straddle at least one chunk boundary
        assert first // budget != (first + item.images[0].num_tokens - 1) // budget
        assert first % budget
        assert _tokens(_run(model, [item])) == hf_greedy(reference, [item], GREEDY.max_tokens)


def _system_prompt(tok, image, text: str = "Say what it is.") -> list[int]:
    messages = [
        {"role": "system", "content": LONG_TEXT},  # a long shared text prefix
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(rendered, add_special_tokens=False)


def test_prefix_cache_hits_for_the_same_image(path, reference):
    with _model(path, block_size=16) as model:
        item = model.engine.prepare(_system_prompt(model.tokenizer, 0), [make_image(40, 32, 5)])
        first = _run(model, [item])[0]
        second = _run(model, [item])[0]
        assert first.num_cached_tokens == 0
        # every full block of the prompt but the last token's is served from the cache
        assert second.num_cached_tokens == (len(item.token_ids) - 1) // 16 * 16
        assert second.num_cached_tokens > item.token_ids.index(
            model.engine.loaded.model.image_token_id
        )
        expected = hf_greedy(reference, [item], GREEDY.max_tokens)
        assert _tokens([first]) == _tokens([second]) == expected


def test_different_images_behind_the_same_text_share_no_image_block(path, reference):
    with _model(path, block_size=16) as model:
        tok = model.tokenizer
        ids = _system_prompt(tok, 0)
        a = model.engine.prepare(ids, [make_image(40, 32, 6)])
        b = model.engine.prepare(ids, [make_image(40, 32, 7)])
        assert a.token_ids == b.token_ids  # the same placeholders: only the pixels differ
        _run(model, [a])
        out_b = _run(model, [b])[0]
        first_image_token = b.token_ids.index(model.engine.loaded.model.image_token_id)
        # the text blocks before the image are shared, none holding image tokens is
        assert out_b.num_cached_tokens == first_image_token // 16 * 16 > 0
        assert _tokens([out_b]) == hf_greedy(reference, [b], GREEDY.max_tokens)


def test_preemption_recomputes_images(path, reference):
    # 8 KiB per 16-token block; each request grows to 6 blocks: 11 blocks hold two of the
    # three prompts at admission but not both grown, so one is preempted and recomputed
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with _model(path, block_size=16, kv_cache_memory=11 * 8192) as model:
        tok = model.tokenizer
        inputs = [
            model.engine.prepare(
                chat_ids(tok, 1, LONG_TEXT[: 40 + 10 * i]), [make_image(40, 40, i)]
            )
            for i in range(3)
        ]
        outputs = _run(model, inputs, params)
        assert model.engine.stats().num_preemptions > 0
        assert _tokens(outputs) == hf_greedy(reference, inputs, params.max_tokens)


def test_prepare_refuses_mismatched_images_and_video(path):
    with _model(path) as model:
        engine, tok = model.engine, model.tokenizer
        image = make_image(32, 32, 0)
        with pytest.raises(ValueError, match=r"2 image placeholder\(s\) but 1 image"):
            engine.prepare(chat_ids(tok, 2, "two?"), [image])
        with pytest.raises(ValueError, match=r"0 image placeholder\(s\) but 1 image"):
            engine.prepare(chat_ids(tok, 0, "none?"), [image])
        video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
        ids = tok.apply_chat_template(video, tokenize=False, add_generation_prompt=True)
        with pytest.raises(ValueError, match="video input is not implemented"):
            engine.prepare(tok.encode(ids, add_special_tokens=False), [])
        # an unexpanded placeholder, or one without its image, is refused at submit
        unexpanded = EngineInput(
            chat_ids(tok, 1, "?"), engine.prepare(chat_ids(tok, 1, "?"), [image]).images
        )
        with pytest.raises(ValueError, match="consecutive placeholder tokens"):
            engine.submit(unexpanded, GREEDY, lambda item: None)
        with pytest.raises(ValueError, match="image placeholder"):
            engine.submit(chat_ids(tok, 1, "?"), GREEDY, lambda item: None)


def test_text_model_does_not_accept_images(tiny_checkpoint):
    with _model(tiny_checkpoint) as model:
        assert model.engine.accepts_images is False
        with pytest.raises(ValueError, match="model does not accept images"):
            model.engine.prepare([1, 2, 3], [make_image(32, 32, 0)])
        assert model.engine.prepare([1, 2, 3], []) == EngineInput([1, 2, 3])


def test_vision_model_accepts_images(path):
    with _model(path) as model:
        assert model.engine.accepts_images is True
