"""Reference-free quality control of predictions (no ground truth at inference).

* :mod:`medseg.plan.statistics`: per-case measurements shared by training (the reference) and inference (the check):
  label volumes, connected components, contact with the field-of-view border, image intensity percentiles.
* :mod:`medseg.qc.reference`: what a model folder stores for QC (ranges over the training cases, the
  temperature fitted on the validation cases) — no training case itself.
* :mod:`medseg.qc.signals`: agreement (mean pairwise Dice between ensemble members and between TTA flips) and
  aggregated uncertainty, accumulated slab by slab while the sliding window stitches.
* :mod:`medseg.qc.assess`: the per-case verdict (``ok`` / ``review``), its reasons and a score.
"""
