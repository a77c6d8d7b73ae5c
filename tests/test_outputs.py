"""outputs: grid collection with thumbnails, integer box downscale."""

import numpy as np

from sparvar_jax import outputs


def test_downscale_is_an_integer_box_mean():
  img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  small = outputs.downscale(img, 3)  # long side 6 -> factor 2
  assert small.shape == (2, 3, 3)
  np.testing.assert_array_equal(
      small, np.round(img.reshape(2, 2, 3, 2, 3).astype(np.float32).mean((1, 3))))
  assert outputs.downscale(img, 6) is img  # already small enough


def test_grid_collector_keeps_the_first_images_and_thumbnails_past_the_limit():
  rng = np.random.default_rng(0)
  g = outputs.GridCollector(max_images=5, full_res_upto=3, thumb_side=8)
  imgs = [rng.random((32, 32, 3)).astype(np.float32) for _ in range(7)]
  for im in imgs:
    g.add(im)
  assert g.seen == 7 and len(g.images) == 5 and g.images[0].dtype == np.uint8
  grid = g.grid()  # 5 images > 3: 8-px thumbnails, 5 columns
  assert grid.shape == (2 + 10, 2 + 5 * 10, 3)
  np.testing.assert_array_equal(grid[2:10, 2:10], outputs.downscale(outputs.to_uint8(imgs[0]), 8))
  small = outputs.GridCollector(full_res_upto=16)
  small.add(imgs[0])
  np.testing.assert_array_equal(small.grid(), outputs.make_grid(imgs[0][None]))
