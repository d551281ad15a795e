"""Images in: image folders and robust decoding (``images``), the resumable distributed sampler
(``sampler``), per-sample random streams (``seeding``), pre-extracted code shards (``codes``) and
the embedded Fashion-MNIST demo subset (``fashion_mnist``)."""
