"""Images in: image folders and robust decoding (``images``), tar shards of images (``shards``;
``shards.open_images`` reads either from a path), the resumable distributed sampler
(``sampler``), per-sample random streams (``seeding``), pre-extracted code shards (``codes``) and
the embedded Fashion-MNIST demo subset (``fashion_mnist``)."""
