"""`python -m sparvar_jax.sample` in Infinity mode: a tiny converted Infinity (random
reference weights, d32 family) and a tiny converted T5 (d_model = text_channels = 256),
the 0.06M schedule on CPU; outputs, report, greedy determinism, nearest template,
prompt truncation, and every bad-input path (one paragraph, exit 2, nothing in --out)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from sparvar_jax import configs
from tests.fixtures import tiny_infinity_checkpoint, tiny_t5_checkpoint
from tests.test_sample_cli import _assert_clean_error, _run

# transformers (a test extra) builds the tiny T5; sentencepiece is a dependency of the
# package itself, so its absence fails these tests rather than skipping them.
pytest.importorskip("transformers")

LONG = "a cat on a red sofa " * 150  # > 512 T5 tokens with the tiny sentencepiece


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("inf_cli")
  d = {
      "ck": tiny_infinity_checkpoint(str(root / "inf")),
      "t5": tiny_t5_checkpoint(str(root / "t5"), configs.INFINITY_TINY_D32.text_channels),
      "t5n": tiny_t5_checkpoint(str(root / "t5n"), 32),  # the wrong width
      "root": root,
  }
  var = root / "var_cfg_only"  # a VAR checkpoint's config.json: enough to pick the mode
  var.mkdir()
  (var / "config.json").write_text(json.dumps({"configs": {
      "var": configs.config_to_dict(configs.VAR_TINY),
      "vae": configs.config_to_dict(configs.VQVAE_TINY)}, "meta": {}}))
  d["var"] = str(var)
  empty = root / "t5_empty"
  empty.mkdir()
  d["t5_empty"] = str(empty)
  spiece_only = root / "t5_spiece_only"
  spiece_only.mkdir()
  shutil.copyfile(os.path.join(d["t5"], "spiece.model"), spiece_only / "spiece.model")
  d["t5_spiece_only"] = str(spiece_only)
  files = {"pf_ok": "first prompt from a file\n\n   \nsecond one, café\n",
           "pf_blank": "\n   \n\t\n"}
  for name, content in files.items():
    (root / f"{name}.txt").write_text(content, encoding="utf-8")
    d[name] = str(root / f"{name}.txt")
  (root / "pf_latin1.txt").write_bytes("un caf\xe9 cr\xe8me\n".encode("latin-1"))
  d["pf_latin1"] = str(root / "pf_latin1.txt")
  d["pf_missing"] = str(root / "nope.txt")
  d["pf_dir"] = str(root)  # a directory: unreadable as a file
  return d


def _inf(env, out, *args):
  return _run("--checkpoint", env["ck"], "--t5", env["t5"], "--pn", "0.06M", "--out",
              str(out), *args)


def _png_hw(path):
  with Image.open(path) as im:
    return im.size[1], im.size[0]


def test_greedy_run_files_report_truncation_and_determinism(env, tmp_path):
  args = ("--prompt", "a cat", "--prompt", LONG, "--prompts_file", env["pf_ok"],
          "--aspect", "16:10", "--top_k", "1", "--batch", "2", "--save_npz")
  out = tmp_path / "a"
  p = _inf(env, out, *args)
  assert p.returncode == 0, p.stderr[-3000:]
  # nearest template, progress per scale, truncation warning: all on stderr
  assert "not an Infinity template" in p.stderr and "0.666" in p.stderr
  assert "scale  7/7 (14x21)" in p.stderr
  assert "warning:" in p.stderr and "tokens were dropped" in p.stderr

  r = json.loads((out / "report.json").read_text())
  prompts = ["a cat", LONG, "first prompt from a file", "second one, café"]
  assert [e["prompt"] for e in r["prompts"]] == prompts
  assert r["aspect"] == {"requested": "16:10", "requested_h_div_w": 0.625,
                         "template_h_div_w": 0.666, "is_template": False}
  assert r["pn"] == "0.06M" and r["image_hw"] == [224, 336]
  assert r["schedule"] == [[1, 1], [2, 2], [2, 3], [4, 6], [6, 9], [10, 15], [14, 21]]
  s = r["settings"]
  assert s["cfg"] == [3.0] * 7 and s["tau"] == [1.0] * 7  # Infinity defaults
  assert (s["top_k"], s["top_p"], s["batch"], s["seed"]) == (1, 0.97, 2, 0)
  long_entry = r["prompts"][1]
  assert long_entry["truncated"] and long_entry["tokens"] == 512
  assert long_entry["tokens_before_truncation"] > 512
  dropped = long_entry["tokens_before_truncation"] - 512
  assert len(r["truncation_warnings"]) == 1
  assert f"last {dropped} tokens were dropped" in r["truncation_warnings"][0]
  assert not any(e["truncated"] for i, e in enumerate(r["prompts"]) if i != 1)
  assert [(e["call"], e["batch_row"]) for e in r["prompts"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert {e["seed"] for e in r["prompts"]} == {0} and "fold_in" in r["key_derivation"]
  calls = r["seconds"]["calls"]
  assert [c["prompts"] for c in calls] == [[0, 1], [2, 3]]
  assert all(len(c["per_scale_seconds"]) == 7 and c["decode_seconds"] > 0 for c in calls)
  names = [e["file"] for e in r["prompts"]]
  assert names[0] == "000_a-cat.png" and names[3] == "003_second-one-cafe.png"
  assert names[1].startswith("001_a-cat-on-a-red-sofa") and len(names[1]) <= 4 + 40 + 4
  assert sorted(r["files"]) == sorted(names + ["grid.png", "samples.npz", "report.json"])
  assert sorted(os.listdir(out)) == sorted(r["files"])  # and no temp files
  for n in names:
    assert _png_hw(out / n) == (224, 336)
  assert _png_hw(out / "grid.png") == (2 + 226, 2 + 4 * 338)

  npz = np.load(out / "samples.npz")
  assert npz["image_BHW3"].shape == (4, 224, 336, 3)
  assert 0.0 <= npz["image_BHW3"].min() and npz["image_BHW3"].max() <= 1.0
  sched = r["schedule"]
  for si, (h, w) in enumerate(sched):
    assert npz[f"bits_scale{si}"].shape == (4, h * w, 32)
  # the text matters: different prompts, different bits at the last scale
  last = npz["bits_scale6"]
  assert not np.array_equal(last[0], last[2])

  out2 = tmp_path / "b"
  p2 = _inf(env, out2, *args)
  assert p2.returncode == 0, p2.stderr[-3000:]
  npz2 = np.load(out2 / "samples.npz")
  for si in range(7):
    np.testing.assert_array_equal(npz[f"bits_scale{si}"], npz2[f"bits_scale{si}"])
  np.testing.assert_array_equal(npz["image_BHW3"], npz2["image_BHW3"])


def test_sampled_run_negative_prompt_per_scale_lists(env, tmp_path):
  out = tmp_path / "c"
  cfg = "1,2,3,3,3,4,4"
  p = _inf(env, out, "--prompt", "a dog", "--negative_prompt", "blurry", "--cfg", cfg,
           "--tau", "0.5", "--top_p", "0.9", "--seed", "7")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "not an Infinity template" not in p.stderr
  r = json.loads((out / "report.json").read_text())
  assert r["aspect"]["is_template"] and r["aspect"]["template_h_div_w"] == 1.0
  assert r["image_hw"] == [256, 256] and r["negative_prompt"] == "blurry"
  s = r["settings"]
  assert s["cfg"] == [float(x) for x in cfg.split(",")] and s["tau"] == [0.5] * 7
  assert (s["top_k"], s["top_p"], s["batch"]) == (900, 0.9, 1)
  assert r["prompts"][0]["seed"] == 7 and r["truncation_warnings"] == []
  assert sorted(os.listdir(out)) == ["000_a-dog.png", "grid.png", "report.json"]
  assert _png_hw(out / "000_a-dog.png") == (256, 256)


_ERRORS = [
    # (args after --checkpoint <ck>; {name} is replaced by the fixture path, needles)
    (["--prompt", "x"], ["needs a T5", "--t5 DIR", "convert.t5"], False),
    (["--t5", "{root}/no_t5", "--prompt", "x"], ["does not exist", "convert.t5"], False),
    (["--t5", "{t5_empty}", "--prompt", "x"], ["spiece.model"], False),
    (["--t5", "{t5_spiece_only}", "--prompt", "x"], ["config.json"], False),
    (["--t5", "{t5n}", "--prompt", "x"], ["32-wide", "text_channels=256"], False),
    (["--t5", "{t5}"], ["no prompt given", "--prompt", "--prompts_file"], False),
    (["--t5", "{t5}", "--prompt", "  "], ["--prompt is empty"], False),
    (["--t5", "{t5}", "--prompts_file", "{pf_missing}"], ["--prompts_file", "does not exist"],
     False),
    (["--t5", "{t5}", "--prompts_file", "{pf_dir}"], ["cannot read --prompts_file"], False),
    (["--t5", "{t5}", "--prompts_file", "{pf_latin1}"], ["not UTF-8", "0xe9"], False),
    (["--t5", "{t5}", "--prompts_file", "{pf_blank}"], ["holds no prompts"], False),
    (["--t5", "{t5}", "--prompt", "x", "--pn", "2M"], ["unknown --pn '2M'", "0.06M"], False),
    (["--t5", "{t5}", "--prompt", "x", "--aspect", "wide"], ["--aspect", "cannot read aspect"],
     False),
    (["--t5", "{t5}", "--prompt", "x", "--aspect", "0:1"], ["cannot read aspect"], False),
    (["--t5", "{t5}", "--prompt", "x", "--pn", "0.06M", "--cfg", "1,2,3"],
     ["--cfg gives 3 values", "0.06M schedule has 7 scales"], False),
    (["--t5", "{t5}", "--prompt", "x", "--cfg", "nan"], ["--cfg values must be finite"], False),
    (["--t5", "{t5}", "--prompt", "x", "--cfg", "-1"], ["--cfg must be >= 0"], False),
    (["--t5", "{t5}", "--prompt", "x", "--cfg", "high"], ["--cfg must be a number"], False),
    (["--t5", "{t5}", "--prompt", "x", "--tau", "0"], ["tau must be > 0"], False),
    (["--t5", "{t5}", "--prompt", "x", "--tau", "1,1"], ["--tau gives 2 values",
                                                           "1M schedule has 13 scales"], False),
    (["--t5", "{t5}", "--prompt", "x", "--tau", "inf"], ["--tau values must be finite"], False),
    (["--t5", "{t5}", "--prompt", "x", "--top_k", "-1"], ["top_k must be >= 0"], False),
    (["--t5", "{t5}", "--prompt", "x", "--top_p", "1.5"], ["top_p must be in [0, 1]"], False),
    (["--t5", "{t5}", "--prompt", "x", "--batch", "0"], ["--batch must be >= 1"], False),
    (["--t5", "{t5}", "--prompt", "x", "--labels", "3"], ["--labels", "only apply to VAR"],
     False),
    (["--t5", "{t5}", "--prompt", "x", "--more_smooth"], ["--more_smooth", "only apply to VAR"],
     False),
    # Infinity-only flags with a VAR checkpoint or the default model (True: no --checkpoint
    # <ck>; the args carry their own)
    (["--checkpoint", "{var}", "--t5", "{t5}"], ["--t5", "only apply to Infinity", "VAR"], True),
    (["--prompt", "a cat", "--pn", "1M"], ["--prompt, --pn", "only apply to Infinity",
                                            "demo model (--demo var)"], True),
    (["--tau", "1", "--aspect", "1:1", "--negative_prompt", "x", "--prompts_file", "f"],
     ["--prompts_file", "--negative_prompt", "--aspect", "--tau"], True),
]


@pytest.mark.parametrize("args,needles,own_ckpt", _ERRORS,
                         ids=[f"{i:02d}" for i in range(len(_ERRORS))])
def test_bad_input_is_one_clean_paragraph(env, tmp_path, args, needles, own_ckpt):
  out = tmp_path / "o"
  args = [a.format(**env) for a in args]
  p = _run(*([] if own_ckpt else ["--checkpoint", env["ck"]]), "--out", str(out), *args)
  _assert_clean_error(p, "error:", *needles)
  msg = p.stderr[p.stderr.index("error:"):].strip()
  assert "\n" not in msg, msg  # one paragraph
  assert not out.exists() or not os.listdir(out)  # nothing written


def test_t5_features_encoded_in_bounded_chunks(env, monkeypatch):
  """A long prompts file must not go through T5 as one batch (its [B, heads, L, L]
  attention tensors grow with the number of prompts): the CLI's encoder helper makes
  calls of at most `chunk` prompts at one padded length, with the same features and
  lengths as a single call, and warns once per over-long prompt with its own index."""
  import warnings
  from sparvar_jax import sample_infinity, text
  enc, tok = text.load_t5(env["t5"])
  prompts = ["a cat", "a dog on a red sofa", "x", LONG, "first prompt", "a cat"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", text.PromptTruncatedWarning)
    want_f, want_l = text.encode_prompts(enc, tok, prompts)
  sizes, real = [], text.encode_token_rows

  def spy(e, rows, length):
    sizes.append(len(rows))
    return real(e, rows, length)

  monkeypatch.setattr(text, "encode_token_rows", spy)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", text.PromptTruncatedWarning)
    feats, lens = sample_infinity.encode_texts(enc, tok, prompts, chunk=4)
  trunc = [str(w.message) for w in caught if issubclass(w.category, text.PromptTruncatedWarning)]
  assert len(trunc) == 1 and trunc[0].startswith("prompt 3 "), trunc
  assert sizes == [4, 4]  # one compiled shape: the last chunk is padded with copies
  np.testing.assert_array_equal(lens, want_l)
  want_f = np.asarray(want_f)
  assert feats.shape == want_f.shape and feats.dtype == np.float32
  assert np.linalg.norm(feats - want_f) <= 1e-6 * np.linalg.norm(want_f)


def test_many_prompts_stream_to_disk_with_a_bounded_grid(env, tmp_path):
  """70 prompts: every PNG written, grid.png holds the first 64 as 256-px thumbnails, and the
  report says so (RAM holds the grid, not one float image per prompt)."""
  pf = tmp_path / "many.txt"
  pf.write_text("".join(f"prompt number {i}\n" for i in range(70)), encoding="utf-8")
  out = tmp_path / "many"
  p = _inf(env, out, "--prompts_file", str(pf), "--batch", "8", "--top_k", "1")
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads((out / "report.json").read_text())
  assert len(r["prompts"]) == 70 and r["image_shape"] == [70, 256, 256, 3]
  assert r["grid"] == {"images": 64, "of": 70, "thumbnails": True}
  assert len(list(out.glob("0*_prompt-number-*.png"))) == 70
  assert _png_hw(out / "069_prompt-number-69.png") == (256, 256)
  # 8 columns x 8 rows of 256-px thumbnails (the images are 256 px: factor 1) + 2-px padding
  assert _png_hw(out / "grid.png") == (2 + 8 * 258, 2 + 8 * 258)
  assert [(e["call"], e["batch_row"]) for e in r["prompts"]][8:10] == [(1, 0), (1, 1)]


@pytest.mark.parametrize("sig,code,name", [("SIGINT", 130, "Ctrl-C (SIGINT)"),
                                           ("SIGTERM", 143, "SIGTERM")])
def test_interrupted_run_keeps_finished_images_and_says_so(tmp_path, sig, code, name):
  import signal
  import subprocess
  import sys
  import time
  from tests.test_sample_cli import _ROOT
  out = tmp_path / "int"
  args = ["--pn", "0.06M", "--batch", "1"]
  for i in range(12):
    args += ["--prompt", f"prompt {i}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "sparvar_jax.sample", "--out", str(out), *args],
                          cwd=_ROOT, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 200
  while time.time() < deadline and not list(out.glob("000_*.png")):
    time.sleep(0.2)
  proc.send_signal(getattr(signal, sig))
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-3000:]
  assert "Traceback" not in err and "images finished so far" in err
  r = json.loads((out / "report.json").read_text())
  assert r["interrupted"] == name
  assert 1 <= len(r["prompts"]) < 12
  assert sorted(os.listdir(out)) == sorted(r["files"])  # no temp file, nothing unlisted
  for e in r["prompts"]:
    assert _png_hw(out / e["file"]) == (256, 256)  # complete PNGs
