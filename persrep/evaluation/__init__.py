"""Evaluation of (personalised) representations: classification, retrieval, detection, segmentation.

Backbone-independent: everything works on precomputed features from any
:class:`~persrep.evaluation.features.FeatureExtractor`.

- ``features``        the extractor protocol and feature-space helpers
- ``metrics``         AP, ROC-AUC, NDCG, MRR, recall@k, hit@k (numpy, scikit-learn semantics)
- ``classification``  one-vs-all over the test pool (max cosine to the 3 training embeddings)
- ``retrieval``       the instance's test photos query every instance's training photos
- ``dense``           training-free mask/box/confidence prediction from patch features
- ``coco_eval``       single-category COCO mAP, mAP50, best F1@0.5 (pycocotools), mask IoU
- ``dense_task``      detection + segmentation of one instance over the dense pool
- ``records``         Score / Skipped results and tidy rows
- ``cache``           EmbeddingCache: embed each pool once per extractor (memory + .npy files)
- ``suite``           evaluate_instance / evaluate_all and the embed_* input builders
- ``aggregate``       results frames and mean/std over instances (pandas)

Submodules are imported explicitly (``from persrep.evaluation.suite import evaluate_all``) so
that importing the package stays cheap.
"""
