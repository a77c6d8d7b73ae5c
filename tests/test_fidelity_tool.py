"""scripts/compare_sparse_dense.py runs end to end (random tiny VAR on CPU) and writes what
it promises: the image grid and a JSON with PSNR/SSIM, token agreement and per-layer
attention errors at the sparse scales."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fidelity_tool_on_the_demo_model(tmp_path):
  out = tmp_path / "fid"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  p = subprocess.run([sys.executable, "scripts/compare_sparse_dense.py", "--demo", "var",
                      "--labels", "3", "--seeds", "0", "--variants", "sparvar,sparvar_skip2",
                      "--out", str(out)], cwd=_ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads((out / "fidelity.json").read_text())
  assert r["columns"] == ["dense", "sparvar", "sparvar_skip2"] and r["random_weights"]
  item = r["items"][0]["variants"]
  full, skip = item["sparvar"], item["sparvar_skip2"]
  assert 0 < full["psnr"] <= 100 and -1 <= full["ssim"] <= 1
  assert len(full["token_agreement_per_scale"]) == 10 and len(skip["token_agreement_per_scale"]) == 8
  # dense before the decision scale (7): every token agrees
  assert full["token_agreement_per_scale"][:7] == [1.0] * 7
  # per-layer errors: exact at the decision scale (its CS4A layers return dense output),
  # sparse after it
  errs = full["attention_rel_error"]
  assert sorted(errs) == ["7", "8", "9"] and len(errs["8"]) == 2
  assert max(errs["7"]) < 1e-5 and min(errs["9"]) > 1e-3
  assert skip["psnr"] < full["psnr"]  # skipping the last two scales loses the detail
  with Image.open(out / "fidelity.png") as im:
    assert im.size == (2 + 3 * 258, 2 + 258)
  assert np.isfinite(r["summary"]["sparvar"]["psnr_mean"])
  assert sorted(os.listdir(out)) == sorted(r["files"])
