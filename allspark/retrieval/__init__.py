"""Remote-sensing image-text retrieval through the language model (CISEN on AllSpark).

Images go encoder -> bridge -> LLM and captions go through the same frozen LLM; both are pooled,
projected into one embedding space and aligned with the symmetric InfoNCE loss (LuoJiaHOG paper, Eq. 25).
The image side carries the V2TMap residual adapter (Eq. 18-19); the second training stage adds the
hierarchical feature enhancement (HFE, Eq. 20-24) with V2TMap frozen. Pieces:

- :mod:`allspark.retrieval.scenes`: the generated aerial-like demo scenes with captions and two-level labels
- :mod:`allspark.retrieval.losses`: cross-process gathering with gradient, the symmetric InfoNCE loss
- :mod:`allspark.retrieval.modules`: V2TMap and HFE
- :mod:`allspark.retrieval.baseline`: test metrics of the untrained model (the reference a run must beat)
- :mod:`allspark.retrieval.sampling`: LuoJiaHOG's geo-aware sampling (Moran's I, local Moran, Getis-Ord Gi*,
  the region/class budget allocation of Eq. 1-12; ``scripts/geo_sampling.py``)
- :mod:`allspark.retrieval.labels`: the three-level label tree, extensible from a file
- the head ``contrastive_retrieval`` (heads/retrieval.py), the encoder ``image_pyramid``
  (encoders/image_pyramid.py), the readers ``rsicd_captions`` and ``luojiahog`` (allspark/data/captions.py),
  the metrics (allspark/metrics/retrieval.py) and the evaluator ``retrieval`` (allspark/evaluation/retrieval.py).

Training: ``train.stages`` in configs/rgb-text.yaml runs stage 1 (everything trainable: bridge, projections,
V2TMap, temperature, LLM adapters) and then stage 2 (``model.head.args.hfe: true`` with
``train.train_only: ["head.hfe.*"]``: every stage-1 weight is held, only HFE trains), each stage in its own
folder, the second initialised from the first's ``best/`` (``train.init_from``); see
:func:`allspark.training.train_stages`. ``train.stages=[]`` trains one stage.

Deviations from the paper, all documented where they live: the image and caption features come from one
LLM (AllSpark) instead of CLIP's two towers; projections start with a batch norm (the LLM's pooled states
share one large component); HFE's output is added to the V2TMap feature through a zero-initialised
projection (stage 2 starts exactly at stage 1); the learning-rate schedule is cosine instead of a step at
epoch 40.
"""
