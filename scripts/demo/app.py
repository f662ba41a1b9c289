"""``unitok demo``: a gradio web app with three tabs, Chat, Text to image and Tokenizer.

The app binds 127.0.0.1 unless ``--listen`` is given, never creates share links and sends no
analytics. Every event that uses the models runs in one queue, one at a time; uploads are checked
(size, format, pixel count) and refused with a message in the page.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unitok.scripts.demo.backend import DEFAULT_MODEL, MAX_IMAGES, DemoBackend, Message
from unitok.scripts.demo.uploads import UploadError, UploadLimits

if TYPE_CHECKING:
    import gradio as gr
    from PIL.Image import Image

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
DEFAULT_PORT = 7860
# Every event that touches a model shares this queue slot, so requests from any tab run one at a time.
MODEL_QUEUE = "model"
# Model images are small (64 px for the tiny model): show them large, with visible pixels.
CSS = """
#tok-original img, #tok-reconstruction img, #chat-image img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
#t2i-gallery img { image-rendering: pixelated; }
"""


def _import_gradio():
    # Analytics would phone home from the server; the env switch must be set before gradio reads it.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


class DemoHandlers:
    """The app's event handlers: plain functions of component values, tested without a browser.

    User mistakes and refused uploads raise ``gr.Error`` (shown in the page as a message, never a traceback).
    """

    def __init__(self, backend: DemoBackend) -> None:
        self.backend = backend
        self.gr = _import_gradio()

    def _error(self, err: Exception) -> Exception:
        return self.gr.Error(str(err), print_exception=False)

    def open_upload(self, path: str | None) -> Image | None:
        """The validated image of an upload (None when the upload was cleared)."""
        if path is None:
            return None
        try:
            return self.backend.load_image(path)
        except UploadError as err:
            raise self._error(err) from None

    # ------------------------------------------------------------------ chat

    def chat_image(self, path: str | None) -> tuple[Image | None, Image | None, list, list]:
        """New chat image (or none): preview, image state, and a fresh conversation (shown, history)."""
        image = self.open_upload(path)
        return image, image, [], []

    def chat(
        self,
        question: str,
        history: list[Message],
        image: Image | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[tuple[str, list[Message], list[Message]]]:
        """Answer ``question`` as a stream of (cleared textbox, conversation shown, history kept) updates."""
        question = (question or "").strip()
        if not question:
            raise self.gr.Error("Type a question first.", print_exception=False)
        messages = [*history, {"role": "user", "content": question}]
        shown = [*messages, {"role": "assistant", "content": ""}]
        yield "", shown, history
        answer = ""
        try:
            for answer in self.backend.chat_stream(
                messages,
                image,
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
            ):
                shown = [*messages, {"role": "assistant", "content": answer}]
                yield "", shown, history
        except (ValueError, RuntimeError) as err:
            raise self._error(err) from None
        final = [*messages, {"role": "assistant", "content": answer}]
        yield "", final, final

    # ------------------------------------------------------------------ text to image

    def generate(
        self,
        prompt: str,
        cfg_scale: float,
        temperature: float,
        top_k: float,
        top_p: float,
        seed: float | None,
        num_images: float,
        progress: Any = None,
    ) -> list[tuple[Image, str]]:
        """Gallery items (image, caption) for the text-to-image tab; ``progress`` is a ``gr.Progress``."""
        seed = None if seed is None else int(seed)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress((done, total), desc="generating image positions", unit="positions")

        try:
            images = self.backend.generate(
                prompt or "",
                int(num_images),
                cfg_scale=float(cfg_scale),
                temperature=float(temperature),
                top_k=int(top_k),
                top_p=float(top_p),
                seed=seed,
                progress=report,
            )
        except (ValueError, RuntimeError) as err:
            raise self._error(err) from None
        return [(image, f"{prompt.strip()} · seed {seed} · #{i + 1}") for i, image in enumerate(images)]

    # ------------------------------------------------------------------ tokenizer

    def reconstruct(self, path: str | None) -> tuple[Image | None, Image | None, str]:
        """Original (model-sized), reconstruction and a summary line of an uploaded image."""
        image = self.open_upload(path)
        if image is None:
            return None, None, ""
        result = self.backend.reconstruct(image)
        return result.original, result.reconstruction, result.summary()


def build_app(backend: DemoBackend, model_name: str = "") -> gr.Blocks:
    """The gradio app (not launched) on ``backend``; ``model_name`` is shown in the header."""
    gr = _import_gradio()
    handlers = DemoHandlers(backend)
    has_mllm = backend.mllm is not None
    size = backend.image_size
    queued = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}
    kind = "MLLM" if has_mllm else "tokenizer only: chat and text to image need an MLLM checkpoint"
    with gr.Blocks(title="UniTok demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## UniTok demo\nModel: `{model_name or 'in memory'}` ({kind}) · images are {size}x{size} px"
        )
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    chat_file = gr.File(
                        label="Upload an image (starts a new conversation)",
                        file_types=["image"],
                        type="filepath",
                        elem_id="chat-upload",
                    )
                    chat_preview = gr.Image(
                        label="Image",
                        interactive=False,
                        height=256,
                        elem_id="chat-image",
                        buttons=["fullscreen"],
                    )
                    with gr.Accordion("Answer settings", open=False):
                        max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
                        chat_temperature = gr.Slider(
                            0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                        )
                        chat_top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(
                        label="Conversation", height=420, buttons=["copy", "copy_all"], elem_id="chatbot"
                    )
                    question = gr.Textbox(
                        label="Question",
                        placeholder="Ask about the image, then press Enter",
                        elem_id="chat-question",
                        interactive=has_mllm,
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="chat-send", interactive=has_mllm)
                        clear = gr.Button("Clear conversation", elem_id="chat-clear")
            history = gr.State([])
            chat_image = gr.State(None)
            chat_file.change(
                handlers.chat_image, chat_file, [chat_preview, chat_image, chatbot, history], **queued
            )
            chat_inputs = [question, history, chat_image, max_new_tokens, chat_temperature, chat_top_p]
            asks = [
                event(handlers.chat, chat_inputs, [question, chatbot, history], **queued)
                for event in (send.click, question.submit)
            ]
            # Clearing stops an answer still streaming, which would otherwise refill the cleared conversation.
            clear.click(lambda: ([], [], ""), None, [chatbot, history, question], queue=False, cancels=asks)
            # The chatbot's own trash button empties the display; the kept history must follow.
            chatbot.clear(lambda: [], None, history, queue=False)

        with gr.Tab("Text to image", id="t2i"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(
                        label="Prompt", placeholder="a red circle on the left", elem_id="t2i-prompt"
                    )
                    cfg_scale = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="CFG scale")
                    t2i_temperature = gr.Slider(
                        0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)"
                    )
                    top_k = gr.Slider(
                        0, backend.tokenizer.config.codebook_size, value=0, step=1, label="Top-k (0 = off)"
                    )
                    t2i_top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="t2i-seed")
                    num_images = gr.Slider(
                        1, MAX_IMAGES, value=1, step=1, label="Number of images", elem_id="t2i-count"
                    )
                    generate = gr.Button(
                        "Generate", variant="primary", elem_id="t2i-generate", interactive=has_mllm
                    )
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Generated images",
                        columns=MAX_IMAGES,
                        format="png",
                        buttons=["download", "download_all", "fullscreen"],
                        interactive=False,
                        elem_id="t2i-gallery",
                    )
            t2i_inputs = [prompt, cfg_scale, t2i_temperature, top_k, t2i_top_p, seed, num_images]

            # gradio hands a progress tracker to the parameter whose default is a gr.Progress.
            tracker = gr.Progress()

            def run_generate(*values, progress=tracker):
                return handlers.generate(*values, progress=progress)

            for event in (generate.click, prompt.submit):
                event(run_generate, t2i_inputs, gallery, **queued)

        with gr.Tab("Tokenizer", id="tokenizer"):
            tok_file = gr.File(
                label="Upload an image", file_types=["image"], type="filepath", elem_id="tok-upload"
            )
            with gr.Row():
                original = gr.Image(
                    label=f"Original ({size}x{size})",
                    interactive=False,
                    height=320,
                    buttons=["download", "fullscreen"],
                    elem_id="tok-original",
                )
                reconstruction = gr.Image(
                    label="Reconstruction",
                    interactive=False,
                    height=320,
                    buttons=["download", "fullscreen"],
                    elem_id="tok-reconstruction",
                )
            stats = gr.Markdown(elem_id="tok-stats")
            tok_file.change(handlers.reconstruct, tok_file, [original, reconstruction, stats], **queued)
    return app


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Web app: chat about an image, text to image, and the tokenizer's reconstructions.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="MLLM or UniTok checkpoint, or a folder holding one (default: the quick start's output)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free port)")
    parser.add_argument(
        "--listen",
        action="store_true",
        help=f"serve on all network interfaces ({ALL_INTERFACES}) instead of {LOCALHOST} only",
    )
    defaults = UploadLimits()
    parser.add_argument(
        "--max-upload-mb", type=float, default=defaults.max_bytes / 2**20, help="largest accepted upload"
    )
    parser.add_argument(
        "--max-upload-pixels",
        type=int,
        default=defaults.max_pixels,
        help="largest accepted image (width * height)",
    )
    parser.add_argument(
        "--queue-size", type=int, default=16, help="requests waiting at most; more are refused"
    )
    return parser


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch(
    app: gr.Blocks,
    host: str = LOCALHOST,
    port: int = DEFAULT_PORT,
    limits: UploadLimits | None = None,
    queue_size: int = 16,
    block: bool = True,
) -> str:
    """Queue and serve ``app`` (no share link); returns its URL. ``block=False`` returns at once."""
    limits = limits or UploadLimits()
    port = port or free_port(host)
    if host != LOCALHOST:
        logger.warning(
            "serving on %s: anyone who can reach this machine on port %d can use the model", host, port
        )
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=limits.max_bytes,
        ssr_mode=False,
        show_error=False,
        prevent_thread_lock=not block,
        footer_links=[],
        css=CSS,
    )
    return app.local_url


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_upload_pixels)
    try:
        backend = DemoBackend.load(args.model, limits)
    except (FileNotFoundError, ValueError) as err:
        print(f"unitok demo: {err}", file=sys.stderr)
        return 2
    app = build_app(backend, args.model)
    launch(app, ALL_INTERFACES if args.listen else LOCALHOST, args.port, limits, args.queue_size)
    return 0
