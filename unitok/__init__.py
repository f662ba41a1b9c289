"""UniTok: a unified visual tokenizer for generation and understanding, and the multimodal LLM built on it.

The parts live in sub-packages: ``unitok.tokenizer``, ``unitok.mllm``, ``unitok.data``, ``unitok.eval`` and
``unitok.scripts`` (the ``unitok`` command line). Importing ``unitok`` itself loads none of them.
"""

__version__ = "0.1.0"
# The name on the package index: ``unitok`` there is an unrelated project.
DISTRIBUTION_NAME = "unitok-tokenizer"

__all__ = ["DISTRIBUTION_NAME", "__version__"]
