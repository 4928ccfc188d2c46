"""Input pipelines: tfds sources, image folders, embedded datasets, augmentation."""
