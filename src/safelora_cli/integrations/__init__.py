"""Integrations: safelora inside other tools' loops (``transformers.py``: a Trainer callback).

Nothing here is imported by ``safelora_cli`` itself: each module imports its tool (an optional
extra, ``pip install 'safelora[transformers]'``) and uses only the library API.
"""
