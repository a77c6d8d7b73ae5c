"""The whole VAR path against the official implementation's own outputs.

Official checkpoint files (random weights) -> `convert.var` -> `load_var` -> greedy CFG
generation: identical token indices at every scale and the same image as the official
`autoregressive_infer_cfg` produced (../shared/golden/var_tiny).
"""

import json
import os

import numpy as np
import pytest

from tests.conftest import golden_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from convert import var as convert_var
  g = golden_dir("var_tiny")
  out = str(tmp_path_factory.mktemp("ck") / "var_tiny")
  convert_var.convert(os.path.join(g, "var_tiny.pth"), os.path.join(g, "vae_tiny.pth"), out)
  return g, out


def test_greedy_cfg_matches_official(converted):
  from sparvar_jax.generate import VARGenerator, VARSampling
  from sparvar_jax.models.var import load_var
  g, out = converted
  meta = json.load(open(os.path.join(g, "meta.json")))
  gold = np.load(os.path.join(g, "golden.npz"))
  s = meta["sampling"]
  var, vae = load_var(out)
  gen = VARGenerator(var, vae, batch=s["batch"],
                     settings=VARSampling(cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"],
                                          more_smooth=s["more_smooth"]))
  res = gen(np.asarray(s["labels"]), seed=0)
  for si, idx in enumerate(res.idx_per_scale):
    np.testing.assert_array_equal(idx, gold[f"greedy_idx_scale{si}"], err_msg=f"scale {si}")
  ref_img = gold["greedy_cfg1p5_image_B3HW_0_1"].transpose(0, 2, 3, 1)
  err = np.abs(res.image_BHW3 - ref_img).max()
  assert err <= 1e-4, err
