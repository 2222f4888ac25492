"""Tests of the procedural shapes data set and its weight-free classifier."""
import numpy as np
import pytest

from var_jax.data import shapes
from var_jax.errors import InputError

EVAL_SEED = 2024
EVAL_COUNT = 2000


@pytest.fixture(scope="module")
def eval_set():
  """2000 fresh examples from a seed no other test uses."""
  return shapes.generate(range(EVAL_COUNT), seed=EVAL_SEED)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """float64 (N, H, W, C): separable Gaussian blur over H and W with edge padding."""
  radius = int(np.ceil(3 * sigma))
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-taps**2 / (2 * sigma**2))
  kernel /= kernel.sum()
  height, width = images.shape[1:3]
  padded = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (radius, radius), (0, 0)),
                  mode="edge")
  rows = sum(w * padded[:, :, i:i + width] for i, w in enumerate(kernel))
  return sum(w * rows[:, i:i + height] for i, w in enumerate(kernel))


def perturb(images: np.ndarray, *, blur_sigma: float, noise_std: float, colour_shift: float,
            seed: int = 0) -> np.ndarray:
  """Blur, then per-image per-channel gain (1 +- colour_shift/100) and offset (+-colour_shift),
  then additive Gaussian noise; back to uint8."""
  rng = np.random.default_rng(seed)
  num = images.shape[0]
  out = gaussian_blur(images, blur_sigma)
  out = out * rng.uniform(1 - colour_shift / 100, 1 + colour_shift / 100, (num, 1, 1, 3))
  out = out + rng.uniform(-colour_shift, colour_shift, (num, 1, 1, 3))
  out = out + rng.normal(0.0, noise_std, out.shape)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_class_names_are_ten_distinct_shape_colour_pairs():
  assert shapes.NUM_CLASSES == 10
  assert len(shapes.CLASS_NAMES) == 10
  assert len(set(shapes.CLASS_NAMES)) == 10
  assert shapes.CLASS_NAMES[0] == "red circle"


def test_generate_shapes_and_dtypes():
  images, labels = shapes.generate([0, 1, 2], seed=0)
  assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
  assert labels.shape == (3,) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < shapes.NUM_CLASSES)).all()
  empty_images, empty_labels = shapes.generate([], seed=0)
  assert empty_images.shape == (0, 64, 64, 3) and empty_labels.shape == (0,)


def test_same_seed_and_index_give_identical_pixels():
  first, first_labels = shapes.generate(range(6), seed=11)
  second, second_labels = shapes.generate(range(6), seed=11)
  np.testing.assert_array_equal(first, second)
  np.testing.assert_array_equal(first_labels, second_labels)


def test_different_seed_gives_different_images():
  first, _ = shapes.generate(range(6), seed=11)
  second, _ = shapes.generate(range(6), seed=12)
  for a, b in zip(first, second):
    assert not np.array_equal(a, b)


def test_random_access_matches_sequential_generation():
  all_images, all_labels = shapes.generate(range(10), seed=3)
  some_images, some_labels = shapes.generate([5, 7], seed=3)
  np.testing.assert_array_equal(some_images, all_images[[5, 7]])
  np.testing.assert_array_equal(some_labels, all_labels[[5, 7]])
  order = np.array([9, 0, 9, 4])
  shuffled_images, shuffled_labels = shapes.generate(order, seed=3)
  np.testing.assert_array_equal(shuffled_images, all_images[order])
  np.testing.assert_array_equal(shuffled_labels, all_labels[order])
  from_generator, _ = shapes.generate((int(i) for i in order), seed=3)
  np.testing.assert_array_equal(from_generator, all_images[order])


def test_labels_for_matches_generate():
  _, labels = shapes.generate(range(30), seed=5)
  np.testing.assert_array_equal(shapes.labels_for(range(30), seed=5), labels)


def test_labels_are_balanced():
  labels = shapes.labels_for(range(2000), seed=9)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 200))
  scattered = np.random.default_rng(0).choice(10**6, size=2000, replace=False)
  counts = np.bincount(shapes.labels_for(scattered, seed=9), minlength=10)
  assert counts.min() >= 150 and counts.max() <= 250, counts


def test_shape_stays_inside_on_a_low_chroma_background():
  images, _ = shapes.generate(range(300), seed=21)
  border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
  border = border.astype(np.int32)
  chroma = border.max(axis=-1) - border.min(axis=-1)
  assert chroma.max() < 60, chroma.max()


def test_template_areas_and_centroids_match_rendered_shapes():
  x, y = shapes._pixel_grid(512)
  side = 400.0
  for k, distance_fn in enumerate(shapes._SHAPE_DISTANCES):
    coverage = shapes._coverage(distance_fn(x - 256, y - 256, np.asarray(side)))
    area = coverage.sum()
    assert area / side**2 == pytest.approx(shapes.SHAPE_AREA_FRACTIONS[k], abs=1e-3)
    centroid_offset = ((coverage * y).sum() / area - 256) / side
    assert centroid_offset == pytest.approx(shapes.SHAPE_CENTROID_OFFSETS[k], abs=1e-3)


def test_classifier_is_accurate_on_clean_images(eval_set):
  images, labels = eval_set
  accuracy = (shapes.classify(images) == labels).mean()
  assert accuracy >= 0.99, accuracy


@pytest.mark.parametrize("blur_sigma, noise_std, colour_shift",
                         [(1.0, 8.0, 10.0), (2.0, 10.0, 25.0)])
def test_classifier_is_robust_to_blur_noise_and_colour_shift(eval_set, blur_sigma, noise_std,
                                                             colour_shift):
  images, labels = eval_set
  perturbed = perturb(images, blur_sigma=blur_sigma, noise_std=noise_std,
                      colour_shift=colour_shift)
  accuracy = (shapes.classify(perturbed) == labels).mean()
  assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("image_size", [32, 48, 128])
def test_other_image_sizes_generate_and_classify(image_size):
  images, labels = shapes.generate(range(100), seed=4, image_size=image_size)
  assert images.shape == (100, image_size, image_size, 3)
  assert (shapes.classify(images) == labels).mean() >= 0.99


def test_class_scores_are_probability_like_and_agree_with_classify(eval_set):
  images = eval_set[0][:200]
  scores = shapes.class_scores(images)
  assert scores.shape == (200, 10) and scores.dtype == np.float32
  assert (scores >= 0).all() and (scores <= 1).all()
  np.testing.assert_array_equal(shapes.classify(images), scores.argmax(axis=1))


def test_images_without_a_shape_are_unknown():
  blank = np.full((1, 64, 64, 3), 128, np.uint8)
  noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  np.testing.assert_array_equal(shapes.classify(np.concatenate([blank, noise])),
                                [shapes.UNKNOWN] * 3)


@pytest.mark.parametrize("bad_images, message", [
    (np.zeros((64, 64, 3), np.uint8), "shape"),
    (np.zeros((2, 64, 64, 4), np.uint8), "shape"),
    (np.zeros((2, 64, 64, 3), np.float32), "uint8"),
])
def test_classify_rejects_bad_images(bad_images, message):
  with pytest.raises(InputError, match=message):
    shapes.classify(bad_images)


@pytest.mark.parametrize("image_size", [16, 40, 65, 64.0, True])
def test_generate_rejects_bad_image_size(image_size):
  with pytest.raises(InputError, match="image_size"):
    shapes.generate([0], seed=0, image_size=image_size)


@pytest.mark.parametrize("indices, seed, message", [
    ([[0, 1]], 0, "1-D"),
    (5, 0, "scalar"),
    ([-1], 0, "non-negative"),
    ([0.5], 0, "integers"),
    ([0], -3, "seed"),
    ([0], 1.5, "seed"),
])
def test_generate_rejects_bad_indices_and_seed(indices, seed, message):
  with pytest.raises(InputError, match=message):
    shapes.generate(indices, seed=seed)
