"""Input pipeline: tfds datasets, SimCLR augmentations (tf.data and JAX),
per-host sharding, the offline dataset."""
