"""Evaluation of what pretraining learned, the paper's way (torch + timm only), on the shared
training machinery of :mod:`mae_transfer.engine`:

- :mod:`.knn`: the weighted k-NN monitor (inside pretraining) and evaluation (``tools/knn.py``);
- :mod:`.model`: :class:`~.model.ViTClassifier`, the encoder + ``fc_norm`` / ``head`` with the
  official fine-tuned checkpoints' names;
- :mod:`.config`, :mod:`.data`, :mod:`.trainer`, :mod:`.main`: end-to-end fine-tuning
  (``tools/finetune.py``) and linear probing (``tools/linprobe.py``), ``--eval``, Slurm.
"""
