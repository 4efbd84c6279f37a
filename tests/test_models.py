import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from icot.errors import UserError
from icot.models import CoupledModel, Emulator, Student, decoder_blocks, diagonal_positions, teacher_states
from icot.models.coupled import check_compatible
from icot.models.decoder import edit_block_inputs, gather_rows, replace_rows, set_gradient_checkpointing
from icot.models.emulator import EmulatorOutput, emulation_loss
from icot.models.generation import generate_explicit, generate_implicit, generate_no_cot
from icot.models.io import COMPONENT_FILE, load_component, save_component
from icot.models.teacher_states import normalize_state
from tests.model_helpers import SEP, VOCAB, hand_gpt2_forward, make_decoder, random_example_batch, tiny_gpt2

FAMILIES = ["gpt2", "llama"]


def test_block_lists_are_found_and_unknown_architectures_are_named():
    assert len(decoder_blocks(make_decoder("gpt2", layers=3))) == 3
    assert len(decoder_blocks(make_decoder("llama", layers=2))) == 2

    class NotADecoder(nn.Module):
        pass

    with pytest.raises(UserError, match=r"NotADecoder.*NotADecoder\.h or NotADecoder\.layers"):
        decoder_blocks(NotADecoder())


def test_replace_and_gather_rows_touch_only_the_given_positions():
    hidden = torch.randn(3, 5, 4)
    positions = torch.tensor([0, 2, 4])
    values = torch.randn(3, 4)
    replaced = replace_rows(hidden, positions, values)
    torch.testing.assert_close(gather_rows(replaced, positions), values)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[torch.arange(3), positions] = False
    torch.testing.assert_close(replaced[mask], hidden[mask])


def test_student_injection_matches_hand_written_gpt2_forward():
    decoder = tiny_gpt2(layers=3)
    student = Student(decoder).eval()
    ids, first_sep, _ = random_example_batch(2, 9, first_seps=[3, 5])
    states = torch.randn(2, 3, 16)
    vectors = student.injected_states(states)

    def replace(layer, h):
        h = h.clone()
        for row in range(h.size(0)):
            h[row, first_sep[row]] = vectors[row, layer]
        return h

    expected = hand_gpt2_forward(decoder, ids, edit=replace)
    got = student(ids, torch.ones_like(ids), first_sep, states).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The plain model agrees with the hand-written one, and positions before the separator are untouched.
    plain = hand_gpt2_forward(decoder, ids)
    torch.testing.assert_close(decoder(ids).logits, plain, atol=1e-5, rtol=1e-4)
    for row in range(2):
        s1 = int(first_sep[row])
        torch.testing.assert_close(got[row, :s1], plain[row, :s1], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[row, s1:], plain[row, s1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_injection_reaches_every_layer_and_only_the_separator(family):
    decoder = make_decoder(family)
    ids, first_sep, _ = random_example_batch(2, 8, first_seps=[2, 4])
    states = torch.randn(2, 3, 16)
    seen = {}

    def record(layer, h):
        seen[layer] = h
        return h

    student = Student(decoder).eval()
    vectors = student.injected_states(states)
    with student.injection(states, first_sep), edit_block_inputs(decoder, record):
        decoder(ids)
    # record runs after the injection hook on every layer: it sees the injected rows
    assert sorted(seen) == [0, 1, 2]
    for layer in range(3):
        torch.testing.assert_close(gather_rows(seen[layer], first_sep), vectors[:, layer])
    plain = decoder(ids).logits
    injected = student(ids, torch.ones_like(ids), first_sep, states).logits
    for row in range(2):
        s1 = int(first_sep[row])
        torch.testing.assert_close(injected[row, :s1], plain[row, :s1], atol=1e-5, rtol=1e-4)


def test_prompt_pass_only_injection_edits_the_first_forward_then_unhooks():
    student = Student(tiny_gpt2(seed=4)).eval()
    ids, first_sep, _ = random_example_batch(2, 8, first_seps=[2, 4])
    states = torch.randn(2, 3, 16)
    blocks = decoder_blocks(student.decoder)
    with torch.no_grad():
        with student.injection(states, first_sep, prompt_pass_only=True):
            first = student.decoder(ids).logits
            assert all(not block._forward_pre_hooks for block in blocks)
            second = student.decoder(ids).logits
        torch.testing.assert_close(first, student(ids, torch.ones_like(ids), first_sep, states).logits)
        torch.testing.assert_close(second, student.decoder(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_states_equal_a_direct_gather_from_hidden_states(family):
    teacher = make_decoder(family, layers=4)
    ids, first_sep, second_sep = random_example_batch(3, 14, first_seps=[2, 4, 3], second_seps=[9, 13, 12])
    mask = torch.ones_like(ids)
    for delta in ["dynamic", 0, 2]:
        states, positions = teacher_states(teacher, ids, mask, first_sep, second_sep, delta, return_positions=True)
        hidden = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for row in range(3):
            for layer in range(4):
                expected = normalize_state(hidden[layer][row, positions[row, layer]])
                torch.testing.assert_close(states[row, layer], expected, atol=1e-5, rtol=1e-4)


def test_diagonal_positions_per_example():
    s1, s2 = torch.tensor([2, 5]), torch.tensor([11, 8])
    dynamic = diagonal_positions(s1, s2, 4, "dynamic")
    assert dynamic.tolist() == [[2, 5, 8, 11], [5, 6, 7, 8]]
    assert diagonal_positions(s1, s2, 4, 2).tolist() == [[2, 4, 6, 8], [5, 7, 8, 8]]
    assert diagonal_positions(s1, s2, 3, 0).tolist() == [[2, 2, 2], [5, 5, 5]]


@pytest.mark.parametrize("family", FAMILIES)
def test_student_and_coupled_losses_agree_on_true_teacher_states(family):
    teacher = make_decoder(family, seed=1)
    student = Student(make_decoder(family, seed=2)).eval()
    ids, first_sep, second_sep = random_example_batch(2, 10, first_seps=[3, 4], second_seps=[8, 9])
    mask = torch.ones_like(ids)
    states = teacher_states(teacher, ids, mask, first_sep, second_sep)
    labels = ids.clone()
    labels[:, :5] = -100

    class StatesFromTeacher(nn.Module):   # the emulator replaced by the teacher's true states
        num_layers, hidden_size = 3, 16

        def forward(self, *args, **kwargs):
            return EmulatorOutput(states=states, mixture_logits=None)

    coupled = CoupledModel(StatesFromTeacher(), student)
    expected = student(ids, mask, first_sep, states, labels=labels).loss
    got = coupled(ids, mask, first_sep, labels=labels).loss
    torch.testing.assert_close(got, expected)


def hand_lstm_step(cell: nn.LSTMCell, x: torch.Tensor, state):
    """One LSTM step from its gate equations: (h, (h, c))."""
    h, c = state if state is not None else (torch.zeros_like(x), torch.zeros_like(x))
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c)


def hand_emulator_states(emulator: Emulator, ids: torch.Tensor, first_sep: torch.Tensor) -> torch.Tensor:
    """The emulator's recurrence written as a plain loop over a hand-written GPT-2 forward."""
    predictions, keys, context, lstm_state = [], [], None, None

    def step(layer, h):
        nonlocal context, lstm_state
        current = h[torch.arange(h.size(0)), first_sep]
        mixture = emulator.mixture.weight[0].expand_as(current)
        prediction = emulator.state_mlps[layer](torch.cat([current, mixture], -1))
        predictions.append(prediction)
        context = torch.zeros_like(prediction) if context is None else context
        out, lstm_state = hand_lstm_step(emulator.lstm, prediction + context, lstm_state)
        if keys:
            past = torch.stack(keys, 1)
            weights = torch.softmax(torch.einsum("blh,bh->bl", past, emulator.query_proj(out)), dim=1)
            context = torch.einsum("bl,blh->bh", weights, past)
        keys.append(emulator.key_proj(out))
        h = h.clone()
        h[torch.arange(h.size(0)), first_sep] = emulator.out_proj(torch.cat([out, context], -1))
        return h

    hand_gpt2_forward(emulator.decoder, ids, edit=step)
    return torch.stack(predictions, 1)


def test_emulator_matches_hand_written_recurrence():
    emulator = Emulator(tiny_gpt2(layers=4)).eval()
    ids, first_sep, _ = random_example_batch(3, 9, first_seps=[2, 5, 8])
    got = emulator(ids, torch.ones_like(ids), first_sep).states
    torch.testing.assert_close(got, hand_emulator_states(emulator, ids, first_sep), atol=1e-5, rtol=1e-4)
    target = torch.randn_like(got)
    loss = emulator.loss(EmulatorOutput(got, None), target)["loss"]
    torch.testing.assert_close(loss, ((got - target) ** 2).sum() / 2 / 3)
    torch.testing.assert_close(emulation_loss(got, target), loss)


@pytest.mark.parametrize("mixture_size", [1, VOCAB])
def test_emulator_for_inference_predicts_the_same_states_without_the_last_block(tmp_path, mixture_size):
    emulator = Emulator(tiny_gpt2(layers=4, seed=5), mixture_size=mixture_size).eval()
    ids, first_sep, _ = random_example_batch(3, 9, first_seps=[2, 5, 8])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = emulator(ids, mask, first_sep)
        ran = []
        decoder_blocks(emulator.decoder)[-1].register_forward_hook(lambda *args: ran.append(True))
        got = emulator.for_inference()(ids, mask, first_sep)
    torch.testing.assert_close(got.states, expected.states, atol=1e-6, rtol=1e-5)
    if mixture_size > 1:
        torch.testing.assert_close(got.mixture_logits, expected.mixture_logits)
    else:   # the constant mixture half is folded away
        assert all(mlp[0].in_features == 16 for mlp in emulator.state_mlps)
    assert not ran   # the last block's output is never read
    with pytest.raises(RuntimeError, match="cannot be trained"):
        emulator(ids, mask, first_sep)
    with pytest.raises(UserError, match="prepared for inference"):
        save_component(emulator, tmp_path / "emulator")


@pytest.mark.parametrize("family", FAMILIES)
def test_emulator_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    ids, first_sep, _ = random_example_batch(2, 10, first_seps=[3, 6])
    target = torch.randn(2, 3, 16)
    results = []
    for checkpointing in (False, True):
        emulator = Emulator(make_decoder(family, seed=3), mixture_size=VOCAB)
        emulator.train()
        set_gradient_checkpointing(emulator.decoder, checkpointing)
        decoder = emulator.decoder   # transformers 5 renamed gradient_checkpointing to activation_checkpointing
        renamed = hasattr(decoder, "activation_checkpointing_enable")
        assert (decoder.is_activation_checkpointing if renamed else decoder.is_gradient_checkpointing) == checkpointing
        mixture_targets = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
        output = emulator(ids, torch.ones_like(ids), first_sep, mixture_targets=mixture_targets)
        loss = emulator.loss(output, target, mixture_targets)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in emulator.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and any(k.startswith("decoder.") for k in grads_on)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5, msg=name)


def test_token_mixture_is_supervised_in_training_and_soft_at_inference():
    emulator = Emulator(tiny_gpt2(), mixture_size=VOCAB, temperature=0.05).eval()
    ids, first_sep, _ = random_example_batch(2, 8, first_seps=[3, 4])
    mask = torch.ones_like(ids)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    trained = emulator(ids, mask, first_sep, mixture_targets=targets)
    assert trained.mixture_logits.shape == (2, 3, VOCAB)
    losses = emulator.loss(trained, torch.zeros(2, 3, 16), targets, mixture_weight=0.5)
    expected_ce = torch.nn.functional.cross_entropy(trained.mixture_logits.reshape(6, VOCAB), targets.reshape(6))
    torch.testing.assert_close(losses["mixture_loss"], expected_ce)
    torch.testing.assert_close(losses["loss"], losses["state_loss"] + 0.5 * expected_ce)
    # Layer 0 sees no injected state yet: its hard and soft predictions differ only through m_0.
    soft = emulator(ids, mask, first_sep)
    hidden0 = emulator.decoder.transformer.wte(ids) + emulator.decoder.transformer.wpe(torch.arange(8))
    h0 = hidden0[torch.arange(2), first_sep]
    weights = emulator.mixture.weight
    m0 = ((h0 @ weights.T) / 0.05).softmax(-1) @ weights
    torch.testing.assert_close(soft.states[:, 0], emulator.state_mlps[0](torch.cat([h0, m0], -1)),
                               atol=1e-5, rtol=1e-4)


def left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), SEP)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
            "first_sep": torch.full((len(prompts),), width - 1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_generation_equals_one_by_one(family):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() + [SEP] for n in (3, 6, 4)]
    teacher = make_decoder(family, seed=7)
    coupled = CoupledModel(Emulator(make_decoder(family, seed=8)), Student(make_decoder(family, seed=9))).eval()
    modes = {
        "no_cot": lambda batch: generate_no_cot(teacher, batch, SEP, max_new_tokens=12),
        "explicit": lambda batch: generate_explicit(teacher, batch, SEP, max_new_tokens=12),
        "implicit": lambda batch: generate_implicit(coupled, batch, SEP, max_new_tokens=12),
    }
    for mode, generate in modes.items():
        batched = generate(left_padded(prompts))
        single = [generate(left_padded([prompt]))[0] for prompt in prompts]
        assert batched == single, mode
        assert all(len(row) <= 12 for row in batched)
    # Stopping rules: explicit stops at its second separator, the others at the first.
    for row in modes["explicit"](left_padded(prompts)):
        assert row.count(SEP) <= 2 and (row.count(SEP) < 2 or row[-1] == SEP)
    for row in modes["implicit"](left_padded(prompts)):
        assert row.count(SEP) <= 1


def test_implicit_generation_uses_the_emulator_states():
    prompts = [[5, 6, 7, SEP]]
    coupled = CoupledModel(Emulator(tiny_gpt2(seed=8)), Student(tiny_gpt2(seed=9))).eval()
    batch = left_padded(prompts)
    with_states = generate_implicit(coupled, batch, SEP, max_new_tokens=8)
    # Making the student ignore its states changes its first greedy logits: the injection is live.
    states = coupled.emulator(batch["input_ids"], batch["attention_mask"], batch["first_sep"]).states
    with coupled.student.injection(states, batch["first_sep"]):
        injected_logits = coupled.student.decoder(batch["input_ids"]).logits[0, -1]
    plain_logits = coupled.student.decoder(batch["input_ids"]).logits[0, -1]
    assert not torch.allclose(injected_logits, plain_logits)
    assert with_states[0][0] == int(injected_logits.argmax())


def test_gpt2_losses_and_unpadded_decoding_log_no_transformers_warning(tmp_path):
    # Two false alarms transformers raises for icot's GPT-2 models: an unnamed loss type, and "input may
    # be padded" once generate drops an all-ones mask (every prompt ends in the separator, the pad id).
    import logging

    from icot.models.decoder import build_decoder, load_decoder

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()   # transformers warns once per process
    try:
        built = build_decoder(tiny_gpt2().config)
        built.save_pretrained(tmp_path)
        ids = torch.tensor([[5, 6, 7, SEP, 8, SEP]])
        for decoder in (built, load_decoder(str(tmp_path))):
            decoder(ids, labels=ids).loss.backward()
            generate_no_cot(decoder.eval(), left_padded([[5, 6, 7, SEP]]), SEP, max_new_tokens=3)
    finally:
        transformers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records if record.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_exact(tmp_path, family):
    ids, first_sep, _ = random_example_batch(2, 8, first_seps=[3, 5])
    mask = torch.ones_like(ids)
    student = Student(make_decoder(family, seed=1)).eval()
    emulator = Emulator(make_decoder(family, seed=2), mixture_size=VOCAB, temperature=0.1).eval()
    states = torch.randn(2, 3, 16)
    save_component(student, tmp_path / "student", extra={"delta": "dynamic"})
    save_component(emulator, tmp_path / "emulator")
    save_component(student.decoder, tmp_path / "teacher")
    student2 = load_component(tmp_path / "student", expect="student").eval()
    emulator2 = load_component(tmp_path / "emulator", expect="emulator").eval()
    teacher2 = load_component(tmp_path / "teacher", expect="decoder").eval()
    assert json.loads((tmp_path / "student" / COMPONENT_FILE).read_text())["delta"] == "dynamic"
    torch.testing.assert_close(student2(ids, mask, first_sep, states).logits,
                               student(ids, mask, first_sep, states).logits, rtol=0, atol=0)
    torch.testing.assert_close(emulator2(ids, mask, first_sep).states, emulator(ids, mask, first_sep).states,
                               rtol=0, atol=0)
    assert emulator2.temperature == 0.1 and emulator2.mixture_size == VOCAB
    torch.testing.assert_close(teacher2(ids).logits, student.decoder(ids).logits, rtol=0, atol=0)
    # The decoder folder is a plain Hugging Face folder.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        for name, tensor in student.decoder.state_dict().items():
            torch.testing.assert_close(hf.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(UserError, match="holds a student, expected a emulator"):
        load_component(tmp_path / "student", expect="emulator")


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(UserError, match="emulator has 3 layers x 16 hidden, student has 2 layers x 16 hidden"):
        CoupledModel(Emulator(tiny_gpt2(layers=3)), Student(tiny_gpt2(layers=2)))
    with pytest.raises(UserError, match="teacher has 4 layers x 16 hidden"):
        check_compatible(teacher=tiny_gpt2(layers=4), student=Student(tiny_gpt2(layers=3)))


def test_activation_and_mlp_width_reach_the_built_decoder():
    """model.activation and model.intermediate set the MLP of a decoder built from scratch; the fused
    gelu_pytorch_tanh computes GPT-2's gelu_new (the same tanh formula) to float32 round-off."""
    from icot.models.decoder import build_decoder, decoder_config

    shape = dict(vocab_size=VOCAB, layers=2, hidden=32, heads=2, max_positions=32)
    default = decoder_config("gpt2", **shape)
    fused = decoder_config("gpt2", **shape, activation="gelu_pytorch_tanh", intermediate=48)
    assert default.activation_function == "gelu_new" and default.n_inner is None
    assert fused.activation_function == "gelu_pytorch_tanh"
    model = build_decoder(fused)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)
    llama = decoder_config("llama", **shape, activation="gelu_pytorch_tanh", intermediate=48)
    assert llama.hidden_act == "gelu_pytorch_tanh" and llama.intermediate_size == 48
    assert decoder_config("llama", **shape).hidden_act == "silu"

    torch.manual_seed(0)
    reference = build_decoder(decoder_config("gpt2", **shape))
    same = build_decoder(decoder_config("gpt2", **shape, activation="gelu_pytorch_tanh"))
    same.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, same(input_ids=ids).logits
    assert (expected - got).abs().max().item() < 1e-5
