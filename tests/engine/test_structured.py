"""Structured output and logit_bias in the engine, on a tiny random model.

A random model writes no JSON by itself: every valid output below is the grammar's doing.
"""

from __future__ import annotations

import json
import pickle

import jsonschema
import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.checkpoints import EOS_TOKEN
from auto_glm.engine.inputs import RequestInputError
from auto_glm.engine.logit_constraints import LogitConstraints
from auto_glm.engine.request import Request
from auto_glm.engine.structured import GrammarCompiler, GrammarError, allowed_tokens
from auto_glm.sampling_params import StructuredOutput
from tests.engine.jobs import finals
from tests.reference import random_prompts
from tests.schemas import PERSON
from tests.schemas import PERSON_SCHEMA as SCHEMA


@pytest.fixture(scope="module")
def model(make_checkpoint):
    path = make_checkpoint("Glm4ForCausalLM", seed=5)
    with GLMModel(str(path), device="cpu", dtype="float32", max_num_seqs=16) as model:
        yield model


def _vocab(model: GLMModel) -> int:
    return model.engine.loaded.model.spec.vocab_size


def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_mixed_batch_constrained_rows_follow_the_schema_and_others_are_untouched(model):
    prompts = random_prompts(_vocab(model), [7, 12, 20, 9, 15], seed=1)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = model.generate_batch(prompts[:1], plain)[0].token_ids
    seeded = SamplingParams(max_tokens=200, temperature=1.0, seed=11, structured_output=PERSON)
    seeded_alone = model.generate_batch(prompts[1:2], seeded)[0].token_ids
    work = [
        (prompts[0], plain),
        (prompts[1], seeded),
        (prompts[2], SamplingParams(max_tokens=200, temperature=0, structured_output=PERSON)),
        (prompts[3], SamplingParams(max_tokens=200, temperature=1.0, structured_output=PERSON)),
        (prompts[4], SamplingParams(max_tokens=200, top_k=5, top_p=0.9, structured_output=PERSON)),
    ]
    outputs = [out.outputs for out in finals(model, work, hold=True)]
    assert outputs[0].token_ids == alone  # an unconstrained row pays nothing, changes nothing
    assert outputs[1].token_ids == seeded_alone  # seeded rows repeat inside any batch
    for out in outputs[1:]:
        _valid(out.text)
        assert out.finish_reason == "stop"  # finished when the grammar completed


def test_equal_schemas_compile_once_and_each_request_has_its_own_matcher(model):
    compiler = model.engine.grammars
    before = compiler.num_compiled
    same = StructuredOutput(
        "json_schema", json.dumps({"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3})
    )
    work = [
        (
            random_prompts(_vocab(model), [5], seed=i)[0],
            SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured_output=same),
        )
        for i in range(6)
    ]
    outputs = [out.outputs for out in finals(model, work, hold=True)]
    assert compiler.num_compiled == before + 1
    assert all(isinstance(json.loads(out.text), list) for out in outputs)


def test_grammar_follows_outputs_through_preemption(make_checkpoint):
    path = make_checkpoint("Glm4ForCausalLM", seed=5)
    # 14 blocks of 16 slots cannot hold 6 requests of ~70 tokens: some are preempted
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 kv heads, dim 16
    options = {"max_num_seqs": 6, "max_model_len": 224, "kv_cache_memory": 14 * block_bytes}
    params = SamplingParams(max_tokens=200, temperature=0, structured_output=PERSON)
    with GLMModel(str(path), device="cpu", dtype="float32", **options) as small:
        prompts = random_prompts(_vocab(small), [20 + i for i in range(6)], seed=2)
        squeezed = small.generate_batch(prompts, params)
        assert small.engine.stats().num_preemptions > 0
    with GLMModel(str(path), device="cpu", dtype="float32") as roomy:
        expected = roomy.generate_batch(prompts, params)
    assert [r.token_ids for r in squeezed] == [r.token_ids for r in expected]
    for result in squeezed:
        _valid(result.text)
        assert result.finish_reason == "stop"


def test_eos_is_allowed_only_once_the_grammar_accepts(model):
    tokenizer = model.tokenizer
    eos, close = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids("}")
    params = SamplingParams(
        max_tokens=20,
        temperature=0,
        logit_bias={eos: 100.0, close: 50.0},  # EOS would win at once if it were allowed
        structured_output=StructuredOutput("json_object"),
    )
    [result] = model.generate_batch(["hello"], params)
    assert (result.text, result.finish_reason) == ("{}", "stop")


def test_bad_schema_is_refused_at_submit_with_the_reason(model):
    bad = StructuredOutput("json_schema", json.dumps({"type": "foo"}))
    with pytest.raises(GrammarError, match="Invalid type: foo"):
        model.engine.submit("hi", SamplingParams(structured_output=bad), lambda _: None)
    with pytest.raises(ValueError, match="not a JSON schema"):
        model.engine.submit(
            "hi",
            SamplingParams(structured_output=StructuredOutput("json_schema", "[1")),
            lambda _: None,
        )
    stats = model.engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)


def test_padded_vocabulary_ids_are_never_allowed(model):
    tokenizer = model.tokenizer
    vocab = len(tokenizer) + 64  # a checkpoint whose embedding is padded past the tokenizer
    compiler = GrammarCompiler(tokenizer, vocab, frozenset({0}))
    grammar = compiler.grammar(StructuredOutput("json_object"))
    allowed = allowed_tokens([grammar], [1], 2, vocab)  # [2, V]: row 0 is unconstrained
    assert allowed.shape == (2, vocab)
    assert allowed[0].all()
    assert allowed[1].nonzero().flatten().tolist() == [tokenizer.convert_tokens_to_ids("{")]
    padded = vocab - 1
    request = Request("r", [1, 2], SamplingParams(logit_bias={padded: 100.0}), grammar=grammar)
    constraints = LogitConstraints.from_requests([request], torch.device("cpu"))
    logits = constraints.apply(torch.zeros(1, vocab))  # [1, V]
    assert int(logits.argmax()) == tokenizer.convert_tokens_to_ids("{")
    assert logits[0, len(tokenizer) :].isneginf().all()


def test_logit_bias_forces_and_bans_tokens(model):
    prompt = random_prompts(_vocab(model), [10], seed=3)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = model.generate_batch(prompt, greedy)[0].token_ids
    forced = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias={77: 100.0})
    assert model.generate_batch(prompt, forced)[0].token_ids == [77] * 8
    banned = SamplingParams(max_tokens=1, temperature=0, logit_bias={plain[0]: -100.0})
    assert model.generate_batch(prompt, banned)[0].token_ids != plain[:1]
    # unbiased rows of the same batch are untouched
    together = finals(model, [(prompt[0], forced), (prompt[0], greedy)], hold=True)
    assert together[1].outputs.token_ids == plain


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(model):
    vocab = _vocab(model)
    with pytest.raises(ValueError, match=rf"\[{vocab}\] are outside the vocabulary \[0, {vocab}\)"):
        model.engine.submit("hi", SamplingParams(logit_bias={vocab: 1.0}), lambda _: None)


def test_a_grammar_that_fails_mid_reply_ends_its_request_with_llguidances_reason_alone(model):
    # a required property holding the whole schema again: llguidance compiles it, then stops
    # at the first token, its parser "too complex"; the reason used to carry its parser
    # state and the whole grammar, a kilobyte, into the client's error
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    params = SamplingParams(
        max_tokens=8,
        temperature=0,
        structured_output=StructuredOutput("json_schema", json.dumps(endless)),
    )
    with pytest.raises(RequestInputError) as failed:  # the request's fault, not the engine's
        model.generate_batch(["hello"], params)
    assert failed.value.code == "invalid_schema"
    copied = pickle.loads(pickle.dumps(failed.value))  # as it crosses an engine process's pipe
    assert (type(copied), str(copied), copied.code) == (
        RequestInputError,
        str(failed.value),
        "invalid_schema",
    )
    message = str(failed.value)
    assert "structured output failed: its grammar rejected token" in message
    assert "Too many items" in message and message.endswith("; simplify the schema")
    assert "<state>" not in message and "<grammar>" not in message and len(message) < 400
    assert model.engine.is_alive
    assert model.generate_batch(["hello"], SamplingParams(max_tokens=2))[0].token_ids
