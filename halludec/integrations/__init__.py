"""Integrations with evaluation harnesses.

- :mod:`halludec.integrations.lm_eval`: the ``halludec-vlm`` model type for EleutherAI's lm-evaluation-harness
  (importing it registers the model; needs ``pip install 'halludec[lmeval]'``), and the entry behind
  ``halludec lm-eval ...``.
- :mod:`halludec.integrations.lm_eval_tasks`: the task folder shipped in the package (POPE per split, CHAIR and
  the lab benchmarks), the data loaders its YAML files call, and ``write_task_dir`` behind
  ``halludec lm-eval-tasks --out DIR``. It needs neither torch nor lm-eval to import.
- :mod:`halludec.integrations.lm_eval_metrics`: per-document results and corpus-level aggregations for those tasks,
  computed with halludec's own parsers and metrics.

This layer sits above ``benchmarks`` and ``lab`` (like ``api`` and ``cli``); nothing below imports it.
"""
