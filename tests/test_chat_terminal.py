"""``unitok chat``: the loop on text streams, and the real command driven through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.scripts.chat import PROMPT, REPLY, TerminalChat
from unitok.scripts.demo.backend import DemoBackend
from unitok.scripts.demo.uploads import open_image

QUESTION = "what colour is the shape ?"


class Recorder:
    """A text stream that keeps every write separately."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "mllm"
    tiny_mllm(tiny_unitok()).save_pretrained(path)
    return path


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (30, 60, 200)).save(path)
    return path


def test_chat_loop_streams_keeps_history_and_handles_commands(model_dir, image_path, tmp_path):
    backend = DemoBackend.load(model_dir)
    out = Recorder()
    chat = TerminalChat(backend, out, max_new_tokens=12)
    assert chat.set_image(str(image_path))
    expected = backend.mllm.chat(
        [{"role": "user", "content": QUESTION}], [open_image(image_path)], max_new_tokens=12
    )
    start = len(out.writes)
    assert chat.ask(QUESTION) == expected
    pieces = out.writes[start + 1 : -1]  # between the reply prefix and the final newline
    assert out.writes[start] == REPLY and "".join(pieces).strip() == expected
    assert len(expected.split()) < 2 or len(pieces) >= 2, f"the answer was written at once: {pieces}"
    assert chat.handle("how many shapes ?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.handle("/reset") and chat.messages == [] and "conversation cleared" in out.text
    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    assert chat.handle(f"/image {bad}") and "notes.png is not an image" in out.text
    assert chat.image_name == str(image_path), "a refused image keeps the previous one"
    assert chat.handle("/nonsense") and "unknown command /nonsense" in out.text
    assert chat.handle("/quit") is False


def _read_until(fd: int, marker: str, buffer: list[str], timeout: float = 120) -> str:
    """Read the terminal until ``marker`` appears after what was consumed; returns the text up to it."""
    deadline = time.monotonic() + timeout
    while marker not in buffer[0]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} on the terminal after {timeout}s; got {buffer[0][-500:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"the terminal closed before {marker!r}; got {buffer[0][-500:]!r}")
            buffer[0] += chunk.replace("\r\n", "\n")
    before, _, buffer[0] = buffer[0].partition(marker)
    return before


def test_unitok_chat_in_a_pseudo_terminal(model_dir, image_path):
    parent, child = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    command = [sys.executable, "-m", "unitok.scripts.cli", "chat", "--model", str(model_dir)]
    process = subprocess.Popen(
        [*command, "--image", str(image_path), "--max-new-tokens", "12"],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
        close_fds=True,
    )
    os.close(child)
    buffer = [""]
    try:
        _read_until(parent, PROMPT, buffer)
        os.write(parent, f"{QUESTION}\n".encode())
        shown = _read_until(parent, PROMPT, buffer)
        answer = shown.split(REPLY, 1)[1].strip()
        backend = DemoBackend.load(model_dir)
        expected = backend.mllm.chat(
            [{"role": "user", "content": QUESTION}], [open_image(image_path)], max_new_tokens=12
        )
        assert answer == expected
        os.write(parent, b"/reset\n")
        assert "conversation cleared" in _read_until(parent, PROMPT, buffer)
        os.write(parent, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(parent)
