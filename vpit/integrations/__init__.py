"""Bridges to other tools' plugin systems; each module imports its tool itself, so `import vpit` needs none of them.

- `vpit.integrations.lmms_eval`: `lmms-eval --model vpit` (the `lmms_eval.models` entry point) and the toy-world
  understanding task written for it.
"""
