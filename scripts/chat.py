"""``unitok chat``: talk with the MLLM about an image in the terminal, for machines without a browser.

Answers stream as they are generated; the conversation keeps its history until ``/reset``.
Commands: ``/image PATH`` switches to another image (and starts a new conversation about it),
``/reset`` forgets the conversation, ``/quit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import TYPE_CHECKING, TextIO

from unitok.scripts.demo.backend import DEFAULT_MODEL, DemoBackend, Message
from unitok.scripts.demo.uploads import UploadError

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

PROMPT = "you> "
REPLY = "unitok> "
HELP = "commands: /image PATH (switch image, new conversation), /reset, /help, /quit"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with the MLLM about an image in the terminal (streamed answers)."
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="MLLM checkpoint, or a folder holding one (default: the quick start's output)",
    )
    parser.add_argument("--image", default=None, help="image to talk about (optional; /image PATH later)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    return parser


class TerminalChat:
    """The chat loop on text streams (stdin/stdout by default); one instance is one session.

    Args:
        backend: the loaded models (needs an MLLM).
        out: where prompts and answers are written.
        max_new_tokens, temperature, top_p: answer generation settings.
    """

    def __init__(
        self,
        backend: DemoBackend,
        out: TextIO = sys.stdout,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> None:
        self.backend = backend
        self.out = out
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.messages: list[Message] = []
        self.image: Image | None = None
        self.image_name: str | None = None

    def say(self, text: str) -> None:
        """Write one line to the terminal."""
        print(text, file=self.out, flush=True)

    def set_image(self, path: str) -> bool:
        """Switch to the image at ``path`` and start a new conversation; False (and a message) if unusable."""
        try:
            image = self.backend.load_image(path)
        except UploadError as err:
            self.say(f"! {err}")
            return False
        self.image, self.image_name = image, path
        self.messages = []
        self.say(f"image: {path} ({image.width}x{image.height}); new conversation")
        return True

    def ask(self, question: str) -> str:
        """Stream the answer to ``question`` onto the terminal and add both turns to the history."""
        self.messages.append({"role": "user", "content": question})
        self.out.write(REPLY)
        self.out.flush()
        answer = ""
        try:
            for answer_so_far in self.backend.chat_stream(self.messages, self.image, **self.settings):
                self.out.write(answer_so_far[len(answer) :])
                self.out.flush()
                answer = answer_so_far
        except (ValueError, RuntimeError) as err:
            self.messages.pop()
            self.out.write("\n")
            self.say(f"! {err}")
            return ""
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/reset":
            self.messages = []
            self.say("conversation cleared")
        elif line == "/help":
            self.say(HELP)
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            if path:
                self.set_image(path)
            else:
                self.say("! usage: /image PATH")
        elif line.startswith("/"):
            self.say(f"! unknown command {line.split()[0]}; {HELP}")
        else:
            self.ask(line)
        return True

    def run(self, read_line=input) -> None:
        """Read lines with ``read_line(prompt)`` until ``/quit``, end of input or Ctrl-C."""
        while True:
            try:
                line = read_line(PROMPT)
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return
            if not self.handle(line):
                return


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ImportError):
        # Line editing and history at the prompt when the terminal offers it.
        import readline  # noqa: F401
    try:
        backend = DemoBackend.load(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"unitok chat: {err}", file=sys.stderr)
        return 2
    if backend.mllm is None:
        print(f"unitok chat: {args.model} holds no MLLM checkpoint (a tokenizer only)", file=sys.stderr)
        return 2
    chat = TerminalChat(backend, sys.stdout, args.max_new_tokens, args.temperature, args.top_p)
    chat.say(f"UniTok chat · {HELP}")
    if args.image is not None and not chat.set_image(args.image):
        return 2
    chat.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
