"""Model table read by lmms-eval's ``LMMS_EVAL_PLUGINS=unitok.eval.lmms`` plugin mechanism."""

AVAILABLE_MODELS = {"unitok": "UniTokLMMS"}
