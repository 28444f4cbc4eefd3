"""Evaluation of vlp models with CLIP_benchmark's metric definitions.

Modules (import them directly; this package imports nothing heavy on its own):

- ``evals.zeroshot``: ``ZeroShotClassifier`` and ``classification_metrics`` (acc1, acc5,
  mean_per_class_recall; multilabel mean_average_precision).
- ``evals.retrieval``: ``retrieval_metrics`` (chunked recall@k and ranks) and
  ``encode_retrieval_set``.
- ``evals.results``: CLIP_benchmark-shaped result JSON (``write_result`` / ``read_result``).
- ``evals.plots``: confusion matrix, recall@k and loss-curve PNGs (matplotlib, Agg canvas).
"""
