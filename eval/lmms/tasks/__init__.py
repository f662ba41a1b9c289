"""Searched by lmms-eval's ``LMMS_EVAL_PLUGINS`` mechanism for task YAMLs (it needs ``<plugin>.tasks``).

The ``synth_vqa`` task is prepared per world by ``unitok eval-vqa`` (its template is in ``unitok.eval.lmms_tasks``);
pass the prepared folder with ``--include_path``.
"""
