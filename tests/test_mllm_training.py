"""Training the tiny MLLM: overfitting one pair of each kind, LoRA, bf16 autocast, gradient checkpointing."""

import pytest
import torch
from mllm_helpers import one_thread, random_codes, tiny_mllm, tiny_unitok  # noqa: F401 (autouse fixture)

from unitok.mllm import GenerationSample, MLLMCollator, UnderstandingSample, UniTokMLLM
from unitok.mllm.generation import generate_image_codes

CAPTION = "a red circle on the left"
QUESTION, ANSWER = "<image> what colour is the shape ?", "blue square on the right"


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


def pair_batch(model):
    samples = [
        GenerationSample(CAPTION, random_codes(model, 4, 4, seed=1)),
        UnderstandingSample([(QUESTION, ANSWER)], [random_codes(model, 4, 4, seed=2)]),
    ]
    return MLLMCollator(model.builder, cfg_dropout=0.0)(samples)


def train(model, batch, steps, lr):
    model.train()
    opt = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=lr)
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return model.eval(), out


@pytest.mark.slow
def test_overfit_one_caption_and_one_question_then_greedy_reproduces(unitok):
    model = tiny_mllm(unitok, seed=1)
    _, out = train(model, pair_batch(model), steps=250, lr=3e-3)
    assert out.code_loss < 0.05 and out.text_loss < 0.05
    codes = generate_image_codes(model, [CAPTION], grid=(4, 4), temperature=0.0)
    assert torch.equal(codes[0], random_codes(model, 4, 4, seed=1))
    assert model.answer(random_codes(model, 4, 4, seed=2), QUESTION, max_new_tokens=10) == [ANSWER]


def test_lora_trains_only_adapter_rows_projector_and_head_and_round_trips(unitok, tmp_path):
    model = tiny_mllm(unitok, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    names = [n for n, _ in model.trainable_parameters()]
    assert any("lora_A" in n for n in names) and any("trainable_tokens_delta" in n for n in names)
    assert all(
        n.startswith(("projector.", "depth_head.")) or "lora_" in n or "trainable_tokens" in n for n in names
    )
    frozen = {n: p.clone() for n, p in model.llm.named_parameters() if not p.requires_grad}
    batch = pair_batch(model)
    train(model, batch, steps=3, lr=1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.llm.named_parameters() if not p.requires_grad)

    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = UniTokMLLM.from_pretrained(tmp_path / "lora").eval()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert model(batch).loss.item() == loaded(batch).loss.item()
    kwargs = dict(grid=(2, 2), cfg_scale=2.0, temperature=0.0)
    assert torch.equal(
        generate_image_codes(model, [CAPTION], **kwargs), generate_image_codes(loaded, [CAPTION], **kwargs)
    )
    # A reloaded inline-config model carries its base weights into the next checkpoint.
    loaded.save_pretrained(tmp_path / "again")
    again = UniTokMLLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_bf16_autocast_forward_backward(unitok):
    model = tiny_mllm(unitok).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pair_batch(model))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.code_loss > 0 and out.text_loss > 0
    assert torch.isfinite(model.projector.fc1.weight.grad).all()
    assert torch.isfinite(model.depth_head.in_proj.weight.grad).all()


def test_gradient_checkpointing_gives_the_same_gradients(unitok):
    grads = []
    for checkpointing in (False, True):
        model = tiny_mllm(unitok, seed=2).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.llm.get_decoder().gradient_checkpointing
        model(pair_batch(model)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_bf16_llm_weights_with_fp32_heads(unitok):
    model = tiny_mllm(unitok, llm_dtype="bfloat16")
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.depth_head.in_proj.weight.dtype == torch.float32
    out = model.train()(pair_batch(model))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.depth_head.in_proj.weight.grad is not None
    codes = generate_image_codes(model.eval(), [CAPTION], grid=(2, 2), temperature=0.0)
    assert codes.shape == (1, 2, 2, model.num_codebooks)
