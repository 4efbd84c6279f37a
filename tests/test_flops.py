"""Model FLOPs and MFU (icot/flops.py): the formula against a hand count, the parameter count against the
built models' matmul weights, the device peaks, and a stage's logged and recorded throughput."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from icot.flops import DecoderFlops, ModelFlops, peak_flops, row_lengths
from tests.train_fixtures import make_workspace, read_scalars, run_train, write_recipe


def test_gpt2_small_by_hand():
    """GPT-2 Small: 12 blocks of width 768, a 3072-wide MLP, 50257 tokens, 1024 positions."""
    from transformers import GPT2Config

    counts = DecoderFlops.of_config(GPT2Config())
    per_block = 4 * 768 * 768 + 2 * 768 * 3072        # q, k, v, out; MLP in and out
    assert per_block == 7_077_888
    assert counts.matmul_parameters == 12 * 7_077_888 + 50257 * 768 == 123_532_032
    assert (counts.layers, counts.attention_width) == (12, 768)
    # 6N + 12 L d T per token at T = 1024: 741,192,192 + 113,246,208.
    assert counts.per_token(1024) == 854_438_400


def matmul_weights(model: nn.Module) -> int:
    """Every weight a matmul reads: nn.Linear and GPT-2's Conv1D (a tied output projection counted once
    as the head it is)."""
    from transformers.pytorch_utils import Conv1D

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, (nn.Linear, Conv1D)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_config_count_is_the_models_matmul_weights(family):
    from icot.models.decoder import build_decoder, decoder_config

    # Llama: grouped-query attention (2 key/value heads of 4) and a gated MLP of another width.
    config = decoder_config(family, vocab_size=97, layers=3, hidden=48, heads=4, max_positions=64, kv_heads=2,
                            intermediate=80)
    decoder = build_decoder(config)
    assert DecoderFlops.of_config(config).matmul_parameters == matmul_weights(decoder)


def test_a_step_counts_each_row_by_its_own_length():
    counts = DecoderFlops(matmul_parameters=1000, layers=2, attention_width=8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    tokens, squares = row_lengths({"cot": {"attention_mask": mask}, "rows": torch.tensor([0, 1])})
    assert (tokens, squares) == (7, 9 + 16)
    by_hand = sum(6 * 1000 * t + 12 * 2 * 8 * t * t for t in (3, 4))
    assert counts.step_flops(tokens, squares) == by_hand
    both = ModelFlops((counts, DecoderFlops(500, 1, 4)))   # emulator + student: both read the tokens
    assert both.step_flops(tokens, squares) == by_hand + sum(6 * 500 * t + 12 * 4 * t * t for t in (3, 4))


def test_only_trained_decoders_count():
    from icot.models.decoder import build_decoder, decoder_config

    config = decoder_config("gpt2", vocab_size=50, layers=1, hidden=16, heads=2, max_positions=32)
    trained, frozen = build_decoder(config), build_decoder(config)
    frozen.requires_grad_(False)
    pair = nn.ModuleDict({"trained": trained, "frozen": frozen})
    assert ModelFlops.of_model(pair).decoders == (DecoderFlops.of_config(config),)


def test_frozen_matmul_weights_of_a_trained_decoder_have_no_weight_gradient_flops():
    """A LoRA-style run: the base's matmuls frozen, a little trained. Their backward computes the
    activations' gradient only: (6 N - 2 F) per token, F the frozen matmul weights."""
    from transformers.pytorch_utils import Conv1D

    from icot.models.decoder import build_decoder, decoder_config

    config = decoder_config("gpt2", vocab_size=50, layers=2, hidden=16, heads=2, max_positions=32)
    decoder = build_decoder(config)
    decoder.requires_grad_(False)
    decoder.transformer.h[1].mlp.c_fc.requires_grad_(True)   # the one trained matmul
    frozen = sum(m.weight.numel() for m in decoder.modules()
                 if isinstance(m, (nn.Linear, Conv1D)) and m is not decoder.transformer.h[1].mlp.c_fc)
    (counts,) = ModelFlops.of_model(decoder).decoders
    full = DecoderFlops.of_config(config)
    assert counts.frozen_parameters == frozen and frozen == full.matmul_parameters - 16 * 64
    assert counts.step_flops(10, 100) == full.step_flops(10, 100) - 2 * frozen * 10


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "fp16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA GeForce GTX 1080", "bf16", None)])
def test_device_peaks_come_from_the_table(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = None if tflops is None else tflops * 1e12
    assert peak_flops("cuda", precision) == expected
    assert peak_flops("cpu", "bf16") is None and peak_flops("cpu", "bf16", given_tflops=2.5) == 2.5e12


def test_a_stage_logs_and_records_tokens_per_s_and_mfu(tmp_path):
    """Every no-CoT row of 3x3 multiplication has one length t, so the recorded FLOPs are exactly
    steps x batch x (6N t + 12 L d t^2), and MFU is their rate over the given peak."""
    from icot.data.collate import view_ids
    from icot.data.tokenizer_build import load_tokenizer
    from icot.evaluate import load_eval_set
    from icot.models.decoder import decoder_config

    make_workspace(tmp_path)
    recipe = write_recipe(tmp_path, train={"log_every": 2})
    run_train(tmp_path, "no_cot", recipe, "--train.peak_tflops=0.5")
    manifest = json.loads((tmp_path / "run/no_cot/manifest.json").read_text())
    figures = manifest["throughput"]

    tokenizer = load_tokenizer(tmp_path / "tok", "the tokenizer")
    lengths = {len(view_ids(f, "nocot")) for f in load_eval_set(tmp_path / "data/train.txt", tokenizer)}
    assert len(lengths) == 1
    t = lengths.pop()
    steps, batch = 4, 16
    config = decoder_config("gpt2", vocab_size=len(tokenizer), layers=2, hidden=32, heads=2, max_positions=128)
    counts = DecoderFlops.of_config(config)
    assert manifest["tokens"] == steps * batch * t
    assert figures["model_flops"] == pytest.approx(steps * batch * (6 * counts.matmul_parameters * t + 12 * 2 * 32 * t * t))
    seconds = figures["step_seconds"]
    assert 0 < seconds <= manifest["train_seconds"]
    assert figures["tokens_per_s"] == pytest.approx(manifest["tokens"] / seconds, rel=1e-3)
    assert figures["samples_per_s"] == pytest.approx(steps * batch / seconds, rel=1e-3)
    assert figures["mfu"] == pytest.approx(figures["model_flops"] / seconds / 0.5e12, rel=1e-3)
    assert figures["peak_flops_per_device"] == 0.5e12

    scalars = read_scalars(tmp_path / "run/no_cot/tb")
    for tag in ("train/tokens_per_s", "train/samples_per_s", "train/model_tflops_per_device", "train/mfu"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
    assert all(0 < value for _, value in scalars["train/mfu"])
