"""Decoding with a static KV cache and a compiled one-token step answers exactly as eager decoding, in
every mode: the same prompt pass (injected states, continuous thoughts, kept positions), the same stops,
on left-padded prompts of different lengths. On the CPU `torch.compile` runs inductor's code without
CUDA graphs."""

from __future__ import annotations

import pytest

from icot import registry
from icot.bench import Shape, build_mode_models, build_task, timed_modes
from icot.data.collate import collate_generate
from icot.errors import UserError
from icot.methods.stepwise.modes import StepwiseModel
from icot.models.static_decoding import CACHE_BUCKET, cache_length, check_decoding

SHAPE = Shape("tiny", "gpt2", layers=2, hidden=32, heads=2, vocab=0, max_positions=128)


def shortened(feature: dict, drop: int) -> dict:
    """The example without its first `drop` tokens: prompts of other lengths, hence left padding."""
    return {**feature, "cot_ids": feature["cot_ids"][drop:], "nocot_ids": feature["nocot_ids"][drop:],
            "prompt_len": feature["prompt_len"] - drop}


@pytest.fixture(scope="module")
def models_and_batch():
    task = build_task("2x2", examples=4, seed=0)
    models = {mode: model for mode, model in build_mode_models(SHAPE, task, seed=3).items() if mode in
              registry.mode_names()}
    for mode_model in models.values():   # icot bench suppresses the separator; here rows stop on it
        mode_model.decoder.generation_config.suppress_tokens = None
    features = [shortened(f, drop) for f, drop in zip(task.features, (0, 2, 1, 3))]
    return models, collate_generate(features, task.separator_id)


def decode(mode_model, batch, decoding: str, max_new_tokens: int = 12) -> list[list[int]]:
    mode_model.decoding = decoding
    try:
        return mode_model.generate(batch, max_new_tokens)
    finally:
        mode_model.decoding = "eager"


@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_every_mode_decodes_as_eager_decoding(models_and_batch, decoding):
    models, batch = models_and_batch
    # Every way of decoding (SIM-CoT's modes decode as their base method's).
    assert set(models) == {mode.name for mode in timed_modes()}
    stopped_early = 0
    for mode, mode_model in models.items():
        eager = decode(mode_model, batch, "eager")
        assert decode(mode_model, batch, decoding) == eager, mode
        stopped_early += sum(len(ids) < 12 for ids in eager)
    assert stopped_early, "no row stopped on its separators: the stop rule went untested"


class ShiftedStepwise(StepwiseModel):
    """A stepwise export trained with kept positions (`position_shift` in its description)."""

    position_shift = 3


def test_kept_positions_decode_as_eager_decoding(models_and_batch):
    models, batch = models_and_batch
    plain = models["stepwise"]
    shifted = ShiftedStepwise("stepwise", plain.model, plain.tokenizer)
    eager = decode(shifted, batch, "eager")
    assert eager != decode(plain, batch, "eager")   # the shift changes what is decoded ...
    assert decode(shifted, batch, "compiled") == eager   # ... and the compiled step keeps it


def test_cache_length_is_bucketed_and_decoding_is_checked():
    assert cache_length(1) == CACHE_BUCKET and cache_length(CACHE_BUCKET + 1) == 2 * CACHE_BUCKET
    with pytest.raises(UserError, match="expected one of eager, static, compiled"):
        check_decoding("graphs")
    with pytest.raises(UserError, match="under ZeRO-3"):
        check_decoding("compiled", synced=True)
    assert check_decoding("static", synced=True) == "static"


def test_the_compiled_step_is_built_once_per_model(models_and_batch):
    from icot.models.static_decoding import COMPILED_STEP, one_token_step

    models, _ = models_and_batch
    decoder = models["no_cot"].decoder
    assert one_token_step(decoder, compiled=True) is one_token_step(decoder, compiled=True)
    assert getattr(decoder, COMPILED_STEP) is one_token_step(decoder, compiled=True)
    assert one_token_step(decoder, compiled=False) is not getattr(decoder, COMPILED_STEP)


def test_a_hook_left_on_the_model_is_refused_by_the_compiled_step(models_and_batch):
    """A compiled graph does not see hooks added after tracing: an edit of the forward that outlives the
    prompt pass would be silently dropped (or kept stale), so compiled decoding refuses it."""
    from icot.models.decoder import edit_block_inputs

    models, batch = models_and_batch
    mode_model = models["no_cot"]
    with edit_block_inputs(mode_model.decoder, lambda layer, hidden: hidden):
        assert decode(mode_model, batch, "static") == decode(mode_model, batch, "eager")
        with pytest.raises(RuntimeError, match="has forward hooks after the prompt pass"):
            decode(mode_model, batch, "compiled")
