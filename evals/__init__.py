"""Evaluation of vlp models with CLIP_benchmark's metric definitions.

Modules (import them directly; this package imports nothing heavy on its own):

- ``evals.zeroshot``: ``ZeroShotClassifier`` (``from_model``, ``from_pretrained``, ``save`` /
  ``load``) and ``classification_metrics`` (acc1, acc5, mean_per_class_recall; multilabel
  mean_average_precision).
- ``evals.retrieval``: ``retrieval_metrics`` (chunked recall@k and ranks), ``encode_captions``
  and ``encode_retrieval_set``.
- ``evals.linear_probe`` / ``evals.fewshot``: logistic-regression probe with a weight-decay
  sweep; nearest-class-mean few-shot classifier.
- ``evals.loading``: any model reference (run, checkpoint, export, open_clip name) ->
  (model, preprocess, tokenizer, info); ``evals.export``: open_clip's hub layout.
- ``evals.datasets``: ``open_eval_set`` (CLIP_benchmark webdataset, image folder, CSV; see
  ``evals.wds_layout`` and ``evals.file_sets``); ``evals.batches``: decoding with failures
  counted; ``evals.tasks``: one function per CLIP_benchmark task.
- ``evals.results``: CLIP_benchmark-shaped result JSON (``write_result`` / ``read_result``).
- ``evals.plots``: confusion matrix, per-class, recall@k and loss-curve PNGs (Agg canvas).
- ``evals.clip_benchmark_cli``: CLIP_benchmark's command line under NumPy >= 2.4.
"""
