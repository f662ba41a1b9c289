"""Multi-turn chat API, the progress callback and the loss options (token-count weighting, z-loss)."""

import pytest
import torch
import torch.nn.functional as F
from mllm_helpers import one_thread, random_codes, tiny_mllm, tiny_unitok  # noqa: F401 (autouse fixture)

from unitok.mllm import GenerationSample, MLLMCollator, TextSample, UnderstandingSample
from unitok.mllm.chat import chat_sequence
from unitok.mllm.sequence import IGNORE_INDEX


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.fixture(scope="module")
def model(unitok):
    return tiny_mllm(unitok).eval()


def user(text):
    return {"role": "user", "content": text}


def test_chat_is_answer_and_stream_joins_to_chat(model):
    grid = random_codes(model, 4, 4, seed=1)
    question = "what colour is the shape ?"
    reply = model.chat([user(question)], grid, max_new_tokens=5)
    assert isinstance(reply, str)
    assert reply == model.answer(grid, question, max_new_tokens=5)[0]
    assert "".join(model.chat_stream([user(question)], grid, max_new_tokens=5)).strip() == reply

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.append(value)

        def end(self):
            self.ended = True

    seen = Collect()
    assert model.chat([user(question)], grid, max_new_tokens=5, streamer=seen) == reply
    assert seen.ended and len(seen.tokens) >= 1


def test_chat_places_images_and_builds_multi_turn_prompts(model):
    grid = random_codes(model, 4, 4, seed=2)
    ids = model.builder.ids
    before = chat_sequence(model, [user("what colour ?")], [grid])
    explicit = chat_sequence(model, [user("<image>\nwhat colour ?")], [grid])
    assert torch.equal(before.input_ids, explicit.input_ids)  # no placeholder: the image goes first
    turns = [user("what colour ?"), {"role": "assistant", "content": "red"}, user("<image> how many ?")]
    seq = chat_sequence(model, turns, grid)
    visual = seq.visual_mask.nonzero()[:, 0]
    eos_at = (seq.input_ids == ids.eos).nonzero()[:, 0]
    assert len(visual) == 16 and len(eos_at) == 1 and eos_at[0] < visual[0]  # image in the second user turn
    assert seq.input_ids[visual[0] - 1] == ids.boi and seq.input_ids[visual[-1] + 1] == ids.eoi
    assert isinstance(model.chat(turns, grid, max_new_tokens=3), str)
    # A [1,3,H,W] image tensor is one image.
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model.chat([user("what colour ?")], img, max_new_tokens=3) == model.chat(
        [user("what colour ?")], img[0], max_new_tokens=3
    )


@pytest.mark.parametrize(
    "messages, images",
    [
        ([], None),
        ([{"role": "assistant", "content": "hi"}], None),
        ([user("a"), {"role": "assistant", "content": "b"}], None),
        ([user("a"), user("b")], None),
        ([{"role": "user", "content": 3}], None),
        ("what colour ?", None),
        ([user("<image> <image> what ?")], "one-image"),
    ],
)
def test_bad_messages_raise(model, messages, images):
    if images == "one-image":
        images = random_codes(model, 4, 4)
    with pytest.raises(ValueError):
        model.chat(messages, images, max_new_tokens=2)
    with pytest.raises(ValueError):
        model.chat_stream(messages, images, max_new_tokens=2)


def test_generate_images_reports_progress(model):
    calls = []
    out = model.generate_images(
        "a red circle", image_size=32, decode=False, seed=0, progress=lambda *a: calls.append(a)
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)] and out.codes.shape[1:3] == (2, 2)


def mixed_batch(model):
    grid = random_codes(model, 4, 4, seed=3)
    samples = [
        TextSample("a red circle on the left"),
        UnderstandingSample([("<image> what colour is the shape ?", "red")], [grid]),
        GenerationSample("a blue square", grid),
    ]
    return MLLMCollator(model.builder, cfg_dropout=0.0)(samples)


def direct_losses(model, batch):
    """The reference's computation: full-vocabulary CE over shifted labels, CE + z over every sub-code."""
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.decode_hidden(embeds, batch.attention_mask, positions)
        logits = model.llm.get_output_embeddings()(hidden).float()
        labels = batch.labels[:, 1:]
        text = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        sel = batch.code_mask[:, 1:]
        targets = batch.codes[:, 1:][sel]
        code_logits = model.depth_head(hidden[:, :-1][sel], targets).float()
        v = code_logits.shape[-1]
        ce = F.cross_entropy(code_logits.reshape(-1, v), targets.reshape(-1))
        z = code_logits.max(-1).values.pow(2).mean()
    return text, int((labels != IGNORE_INDEX).sum()), ce, z, targets.numel()


def test_token_count_weighting_and_z_loss_match_a_direct_computation(unitok):
    model = tiny_mllm(unitok, loss_weighting="token_count", z_loss_weight=0.01).eval()
    batch = mixed_batch(model)
    text, n_text, ce, z, n_img = direct_losses(model, batch)
    with torch.no_grad():
        out = model(batch)
    image = ce + 0.01 * z
    expected = (image * n_img + text * n_text) / (n_img + n_text)
    assert n_img == 16 * model.num_codebooks and out.num_text_targets == n_text
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z_loss, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.code_loss, ce, rtol=1e-5, atol=1e-6)
    # "mean" (the default) is text CE + code loss, each a mean over its own targets.
    mean_model = tiny_mllm(unitok, z_loss_weight=0.01).eval()
    mean_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mean_model(batch).loss, text + image, rtol=1e-5, atol=1e-6)
        # Without z-loss weight the z term is reported but not added.
        plain = tiny_mllm(unitok).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(plain(batch).loss, text + ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "changes", [{"loss_weighting": "sum"}, {"z_loss_weight": -1.0}, {"z_loss_weight": float("nan")}]
)
def test_bad_loss_options_raise(changes):
    from unitok.mllm import MLLMConfig

    with pytest.raises(ValueError):
        MLLMConfig.preset("tiny", **changes)


def test_answer_stops_each_row_at_its_stop_string(model):
    from unitok.eval.lmms.models.unitok import cut_at_stop

    grids = [random_codes(model, 4, 4, seed=s) for s in (2, 3)]
    questions = ["what colour is the shape ?", "how many shapes are there ?"]
    full = model.answer(torch.stack(grids), questions, max_new_tokens=16)
    row = max(range(2), key=lambda i: len(full[i]))
    other = 1 - row
    assert len(full[row]) > 6, full
    # A stop string that only the longer answer holds, a few characters into it.
    candidates = [full[row][j : j + 2] for j in range(3, len(full[row]) - 2)]
    stop = next(c for c in candidates if c.strip() and c not in full[other])
    stopped = model.answer(torch.stack(grids), questions, max_new_tokens=16, stop=[stop])
    assert stop in stopped[row] and len(stopped[row]) < len(full[row]) and full[row].startswith(stopped[row])
    assert cut_at_stop(stopped[row], [stop]) == cut_at_stop(full[row], [stop])
    assert stopped[other] == full[other]
    with pytest.raises(ValueError, match="stop"):
        model.answer(grids[0], questions[0], stop=[""])
