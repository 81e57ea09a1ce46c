"""An engine freezes the heap it starts on (see auto_glm.engine.heap): while it runs, the
collector walks none of what it was built from; once it stops, what it leaves in reference
cycles is freed by the next collection."""

from __future__ import annotations

import gc
import weakref

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.heap import gc_pause_seconds


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_collections_skip_what_a_running_engine_was_built_from(tiny_checkpoint) -> None:
    model = GLMModel(str(tiny_checkpoint), device="cpu", dtype="float32")
    try:
        walked = {id(obj) for obj in gc.get_objects()}  # what a full collection walks
        assert id(model.engine.loaded.model) not in walked
        assert id(model.engine.core.runner) not in walked
        paused = gc_pause_seconds()
        gc.collect()
        assert gc_pause_seconds() > paused  # collections are timed
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        [result] = model.generate_batch(["hello"], params)
        assert len(result.token_ids) == 4
        later = _Cycle()  # made after the start: collected as usual
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None
    finally:
        model.close()


def test_a_stopped_engine_is_freed_by_the_next_collection(tiny_checkpoint) -> None:
    model = GLMModel(str(tiny_checkpoint), device="cpu", dtype="float32")
    weights = weakref.ref(model.engine.loaded.model)
    model.close()
    del model
    gc.collect()
    assert weights() is None
    assert gc.get_freeze_count() == 0
