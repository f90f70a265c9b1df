"""Stage 7: metrics (``metrics``), decoder evaluation (``evaluate``), downstream segmenter (``segmenter``).

Submodules are imported where used, so importing one does not pull in the others' dependencies.
"""
