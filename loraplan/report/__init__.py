"""Reports: validation data (pure Python, ``validation.py``) and HTML/markdown documents with
embedded plots (``html.py``, ``compare.py``; need the ``[report]`` extra: pandas, matplotlib)."""
