"""The MLLM trainer's parts: run config, model preparation for the engine, the ``Trainer`` subclass."""
