"""Evaluation of what pretraining learned, the paper's way (torch + timm only): a weighted
k-NN monitor and evaluation (:mod:`.knn`), end-to-end fine-tuning and linear probing."""
