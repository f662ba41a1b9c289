"""The demo app (``unitok demo``) and what it shares with the terminal chat (``unitok chat``).

- :mod:`.uploads`: opening user images safely (size, format allowlist, decompression bombs);
- :mod:`.backend`: the models behind both, one request at a time, and finding the checkpoint;
- :mod:`.app`: the gradio app (imports gradio; the other two do not).
"""
