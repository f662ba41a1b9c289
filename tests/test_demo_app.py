"""The demo app's event handlers and launch settings, called directly on a tiny random model."""

from __future__ import annotations

import logging

import pytest
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.scripts.demo.app import (
    ALL_INTERFACES,
    LOCALHOST,
    MODEL_QUEUE,
    DemoHandlers,
    build_app,
    launch,
    main,
)
from unitok.scripts.demo.backend import DemoBackend
from unitok.scripts.demo.uploads import UploadLimits

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def handlers() -> DemoHandlers:
    mllm = tiny_mllm(tiny_unitok())
    return DemoHandlers(DemoBackend(mllm.unitok, mllm))


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "shape.png"
    Image.new("RGB", (70, 50), (20, 180, 40)).save(path)
    return path


def test_chat_turn_streams_into_the_conversation(handlers, image_path):
    preview, image, shown, history = handlers.chat_image(str(image_path))
    assert preview is image and image.size == (70, 50) and shown == history == []
    updates = list(handlers.chat("what colour is the shape ?", [], image, 8, 0.0, 1.0))
    cleared, first_shown, kept = updates[0]
    assert cleared == "" and kept == [] and first_shown[-1] == {"role": "assistant", "content": ""}
    _, final_shown, final_history = updates[-1]
    assert final_shown == final_history and [m["role"] for m in final_history] == ["user", "assistant"]
    answer = final_history[-1]["content"]
    assert answer == handlers.backend.mllm.chat(final_history[:1], [image], max_new_tokens=8)
    streamed = [shown[-1]["content"] for _, shown, _ in updates[1:-1]]
    assert all(answer.startswith(text) for text in streamed)
    again = list(handlers.chat("how many shapes ?", final_history, image, 4, 0.0, 1.0))
    assert [m["role"] for m in again[-1][2]] == ["user", "assistant"] * 2


def test_user_mistakes_become_messages_in_the_page(handlers, tmp_path):
    with pytest.raises(gr.Error, match="Type a question"):
        list(handlers.chat("   ", [], None))
    fake = tmp_path / "cat.jpg"
    fake.write_text("meow, not pixels")
    with pytest.raises(gr.Error, match=r"cat\.jpg is not an image"):
        handlers.chat_image(str(fake))
    with pytest.raises(gr.Error, match="non-empty prompt"):
        handlers.generate("", 3.0, 1.0, 0, 1.0, 0, 1)
    tokenizer_only = DemoHandlers(DemoBackend(tiny_unitok()))
    with pytest.raises(gr.Error, match="tokenizer only"):
        list(tokenizer_only.chat("what colour", [], None))


def test_generation_and_reconstruction_handlers(handlers, image_path):
    steps = []
    items = handlers.generate(
        " a red circle ", 2.0, 1.0, 4, 0.9, 5, 2, progress=lambda p, **kw: steps.append(p)
    )
    assert [caption for _, caption in items] == ["a red circle · seed 5 · #1", "a red circle · seed 5 · #2"]
    assert steps and steps[-1][0] == steps[-1][1]
    original, reconstruction, summary = handlers.reconstruct(str(image_path))
    assert original.size == reconstruction.size and "bits" in summary and "PSNR" in summary
    assert handlers.reconstruct(None) == (None, None, "")


def test_every_model_event_shares_one_queue_slot(handlers):
    """Chat, generation and reconstruction from any tab or browser run one at a time."""
    app = build_app(handlers.backend, "tiny")
    model_events = [
        fn for fn in app.fns.values() if fn.name in ("chat", "run_generate", "chat_image", "reconstruct")
    ]
    assert sorted(fn.name for fn in model_events) == [
        "chat",
        "chat",
        "chat_image",
        "reconstruct",
        "run_generate",
        "run_generate",
    ], "the send button and Enter both ask; the button and Enter both generate"
    for fn in model_events:
        assert (fn.concurrency_id, fn.concurrency_limit, fn.queue) == (MODEL_QUEUE, 1, True), fn.name


class FakeApp:
    """Records what :func:`launch` asks of a gradio app."""

    local_url = "http://127.0.0.1:1234/"

    def queue(self, **kwargs):
        self.queued = kwargs

    def launch(self, **kwargs):
        self.launched = kwargs


def test_launch_binds_localhost_unless_asked_and_never_shares(caplog):
    app = FakeApp()
    with caplog.at_level(logging.WARNING):
        launch(app, port=1234, limits=UploadLimits(max_bytes=5), block=False)
    assert app.launched["server_name"] == LOCALHOST and app.launched["share"] is False
    assert app.launched["max_file_size"] == 5 and app.queued["default_concurrency_limit"] == 1
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        launch(app, host=ALL_INTERFACES, port=1234, block=False)
    assert app.launched["server_name"] == ALL_INTERFACES
    assert any("anyone who can reach this machine" in r.getMessage() for r in caplog.records)


def test_demo_command_without_a_model_says_how_to_get_one(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing")]) == 2
    assert "make quickstart" in capsys.readouterr().err
