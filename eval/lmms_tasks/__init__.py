"""lmms-eval task definitions shipped with the package (``synth_vqa``: the synthetic world's VQA split)."""
