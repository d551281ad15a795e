"""Pixels -> metrics, ADM-equal and TensorFlow-free.

- ``inception``: the TF-graph FID Inception (pool_3, mixed_6/conv, bias-free logits) and its weights;
- ``metrics``: Fréchet distance, Inception Score, precision/recall on features;
- ``evaluator``: the ADM CLI (``python -m evaluations.evaluator REF.npz SAMPLE.npz``) and ``evaluate``;
- ``make_reference``: an ADM-style reference batch from an image folder (rFID, own data);
- ``recon``: PSNR and SSIM for tokenizer reconstructions.
"""
