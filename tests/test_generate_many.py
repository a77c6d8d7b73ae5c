"""`python -m sparvar_jax.generate_many` on the random demo models, on the CPU.

Sharded over 4 forced CPU devices it makes the single-device images bit for bit (and the
sample CLI's); two processes under jax.distributed split the items and process 0 merges
one manifest; a slice killed with SIGKILL resumes with no duplicate and no truncated file,
and `--merge` joins the slices; bad JSONL lines are reported with their numbers and
skipped; changed settings are refused; the FID .npz holds the PNGs. The helpers
(items, manifest, npz writer, row shardings) are tested in this process, which keeps its
one device: every multi-device run is a subprocess with XLA_FLAGS set.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sparvar_jax import items as items_lib
from sparvar_jax import manifest, outputs
from sparvar_jax.runner import UsageError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VAR4 = ("--demo", "var", "--classes", "0-1", "--per_class", "2")  # labels 0, 0, 1, 1
_VAR6 = ("--demo", "var", "--classes", "0-2", "--per_class", "2")  # labels 0, 0, 1, 1, 2, 2


def _env(devices: int = 1, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT, **extra)
  env.pop("XLA_FLAGS", None)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    if k not in extra:
      env.pop(k, None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _cmd(*args, module="sparvar_jax.generate_many"):
  return [sys.executable, "-m", module, *args]


def _run(*args, devices: int = 1, timeout: int = 300, **extra):
  return subprocess.run(_cmd(*args), cwd=_ROOT, env=_env(devices, **extra),
                        capture_output=True, text=True, timeout=timeout)


def _records(path) -> list[dict]:
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def _png(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _assert_complete(out, n: int, hw=(256, 256)) -> list[dict]:
  """Every item once in manifest.jsonl, in order, each PNG whole; no temporaries, no
  shards, no locks left."""
  recs = _records(out / "manifest.jsonl")
  assert [r["item"] for r in recs] == list(range(n))
  assert [r["file"] for r in recs] == [f"{i:06d}.png" for i in range(n)]
  for r in recs:
    assert outputs.read_png(str(out / r["file"])).shape == (*hw, 3), r["file"]
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [r["file"] for r in recs]
  assert not [f for f in os.listdir(out) if f.startswith(".") or f.startswith("manifest.p")]
  return recs


def _assert_fid_npz(out, recs):
  npz = np.load(out / "fid_samples.npz")
  assert npz.files == ["arr_0"]
  arr = npz["arr_0"]
  assert arr.dtype == np.uint8 and arr.shape == (len(recs), 256, 256, 3)
  for i, r in enumerate(recs):
    np.testing.assert_array_equal(arr[i], _png(out / r["file"]))


# ------------------------------------------------------------------ CLI, subprocesses


def test_four_devices_make_the_single_device_images(tmp_path):
  """Data parallel over 4 forced CPU devices, 2 rows each, against one device at batch 2
  (the same rows per device): the same PNGs bit for bit, and the sample CLI's images for
  the same seed and labels; the manifest records the key derivation; the .npz is the PNGs."""
  four, one = tmp_path / "four", tmp_path / "one"
  p4 = _run(*_VAR4, "--batch", "8", "--out", str(four), devices=4)
  assert p4.returncode == 0, p4.stderr[-3000:]
  assert "on 4 device(s)" in p4.stderr
  p1 = _run(*_VAR4, "--batch", "2", "--out", str(one))
  assert p1.returncode == 0, p1.stderr[-3000:]
  r4, r1 = _assert_complete(four, 4), _assert_complete(one, 4)
  for a, b in zip(r4, r1):
    np.testing.assert_array_equal(_png(four / a["file"]), _png(one / b["file"]), a["file"])
    assert a["settings"] == b["settings"]
  assert [r["key"] for r in r4] == [f"fold_in(key(0), {i})" for i in range(4)]
  assert [r["label"] for r in r4] == [0, 0, 1, 1]
  assert {r["rows_per_device"] for r in r4} == {2} and r4[0]["settings"]["cfg"] == 1.5
  summary = json.loads((four / "summary.json").read_text())
  assert len(summary["devices"]) == 4 and summary["done"] == 4 and summary["bad_lines"] == []
  assert "fold_in(key_i, k)" in summary["key_derivation"]
  _assert_fid_npz(four, r4)
  # Image i of `sample --seed 0` draws from fold_in(key(0), i) too.
  ps = subprocess.run(_cmd("--demo", "var", "--labels", "0,0", "--batch", "2", "--out",
                           str(tmp_path / "sample"), module="sparvar_jax.sample"),
                      cwd=_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert ps.returncode == 0, ps.stderr[-3000:]
  for i in range(2):
    np.testing.assert_array_equal(_png(tmp_path / "sample" / f"00{i}_class0.png"),
                                  _png(four / f"00000{i}.png"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_split_the_items_and_merge_one_manifest(tmp_path):
  out = tmp_path / "dist"
  port = _free_port()
  args = _cmd(*_VAR6, "--batch", "2", "--out", str(out))
  procs = [subprocess.Popen(args, cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p)))
           for p in (0, 1)]
  errs = []
  for p in procs:
    _, err = p.communicate(timeout=300)
    errs.append(err)
    assert p.returncode == 0, err[-3000:]
  assert "process 1/2: 3 images" in errs[0] and "process 2/2: 3 images" in errs[1]
  recs = _assert_complete(out, 6)
  assert [r["process"] for r in recs] == [0, 1, 0, 1, 0, 1]  # item i on process i % 2
  summary = json.loads((out / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["done"] == 6
  _assert_fid_npz(out, recs)


def _lines(path) -> int:
  try:
    return open(path, encoding="utf-8").read().count("\n")
  except FileNotFoundError:
    return 0


def test_killed_slice_resumes_and_merge_joins_the_slices(tmp_path):
  """Process 1 of 2 (independent jobs, no coordinator) is SIGKILLed after its first image,
  run again (it makes only what is missing), then process 0 runs and --merge writes one
  manifest: every item once, every PNG whole, no temporary left."""
  out = tmp_path / "slices"
  base = (*_VAR6, "--batch", "2", "--num_processes", "2", "--out", str(out))
  shard = out / "manifest.p1-of-2.jsonl"
  p = subprocess.Popen(_cmd(*base, "--process_id", "1"), cwd=_ROOT, env=_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  t0 = time.time()
  while _lines(shard) < 1 and p.poll() is None and time.time() - t0 < 300:
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  made_before = _lines(shard)
  assert 1 <= made_before < 3, "the slice finished before it could be killed"
  again = _run(*base, "--process_id", "1")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"{made_before} of this process's 3 images are done" in again.stderr
  assert f"{3 - made_before} images to make" in again.stderr
  assert "--merge" in again.stderr
  recs1 = _records(shard)
  assert sorted(r["item"] for r in recs1) == [1, 3, 5]  # once each: no duplicate
  p0 = _run(*base, "--process_id", "0")
  assert p0.returncode == 0, p0.stderr[-3000:]
  assert not (out / "manifest.jsonl").exists()  # not merged until asked
  merged = _run(*base, "--merge")
  assert merged.returncode == 0, merged.stderr[-3000:]
  assert "6 of 6 items done" in merged.stderr
  recs = _assert_complete(out, 6)
  assert [r["process"] for r in recs] == [0, 1] * 3
  _assert_fid_npz(out, recs)
  # The same command once more: nothing to make, nothing loaded.
  done = _run(*base, "--process_id", "1")
  assert done.returncode == 0 and "images to make" not in done.stderr, done.stderr[-2000:]
  # Other settings for made items: refused with what changed, nothing touched.
  before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)}
  changed = _run(*base, "--process_id", "1", "--cfg", "2", "--top_k", "5")
  assert changed.returncode == 2 and "Traceback" not in changed.stderr
  assert "cfg 1.5 -> 2.0 (items 0-5)" in changed.stderr, changed.stderr
  assert "top_k 900 -> 5" in changed.stderr and "--allow_changed_settings" in changed.stderr
  assert {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)} == before


def test_bad_lines_are_reported_and_skipped(tmp_path):
  """Infinity JSONL: bad lines are named with their numbers and reasons and skipped; the
  good ones are made, each at its own schedule (a 16:9 item batches apart)."""
  src = tmp_path / "items.jsonl"
  src.write_text("\n".join([
      '{"prompt": "a red fox in the snow"}',
      '{"prompt": "a cat", "seed": 7, "aspect": "16:9"}',
      '',
      '{"prompt": ""}',
      '{"prompt": "broken json"',
      '{"prompt": "a dog", "aspect": "wide"}',
      '{"prompt": "a fish", "cgf": 3}',
      '{"prompt": "a boat", "cfg": [1, 2, 3]}',
      '{"prompt": "a bird", "pn": "2M"}',
  ]) + "\n", encoding="utf-8")
  out = tmp_path / "inf"
  p = _run("--input", str(src), "--pn", "0.06M", "--batch", "1", "--out", str(out))
  assert p.returncode == 0, p.stderr[-3000:]
  for needle in ("line 4: empty prompt; skipped", "line 5: malformed JSON",
                 "line 6: --aspect: cannot read aspect ratio 'wide'", "line 7: unknown key ['cgf']",
                 "line 8: --cfg gives 3 values but the 0.06M schedule has 7 scales",
                 "line 9: unknown --pn '2M'", "6 bad lines skipped"):
    assert needle in p.stderr, (needle, p.stderr[-3000:])
  summary = json.loads((out / "summary.json").read_text())
  assert [b["line"] for b in summary["bad_lines"]] == [4, 5, 6, 7, 8, 9]
  assert [b["item"] for b in summary["bad_lines"]] == [2, 3, 4, 5, 6, 7]
  assert summary["items"] == 8 and summary["done"] == 2 and summary["fid_npz"] is None
  recs = _records(out / "manifest.jsonl")
  assert [(r["item"], r["line"], r["prompt"]) for r in recs] == [
      (0, 1, "a red fox in the snow"), (1, 2, "a cat")]
  assert recs[1]["key"] == "fold_in(key(7), 0)" and recs[1]["settings"]["template"] == 0.571
  assert _png(out / "000000.png").shape == (256, 256, 3)
  assert recs[1]["image_hw"][0] < recs[1]["image_hw"][1]  # landscape
  assert _png(out / "000001.png").shape == (*recs[1]["image_hw"], 3)
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000000.png",
                                                                      "000001.png"]


def test_usage_errors_are_one_paragraph(tmp_path):
  out = tmp_path / "o"
  for args, needle in [
      (("--demo", "var"), "nothing to generate"),
      (("--demo", "var", "--classes", "5-2"), "runs backwards"),
      (("--demo", "var", "--classes", "0-1000"), "class ids must be in [0, 1000)"),
      (("--demo", "var", "--classes", "0-3", "--model_parallel", "2"), "applies to Infinity"),
      (("--demo", "var", "--classes", "0-3", "--pn", "1M"), "--pn do not apply"),
      (("--input", str(tmp_path / "missing.txt")), "does not exist"),
      (("--demo", "var", "--classes", "0-3", "--num_processes", "2", "--process_id", "2"),
       "must be in [0, 2)"),
  ]:
    p = _run(*args, "--out", str(out))
    assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
    assert needle in p.stderr, (args, p.stderr[-2000:])


def test_model_and_data_parallel_on_four_devices():
  """The scale loop on a mesh (tests/sharded_check.py, 4 forced CPU devices, Infinity demo):
  data parallel gives the one-device bits with no collective inside the layer loop; model
  parallel (weights split by heads / FFN units) gives the one-device tokens, latents and
  images, its logits within float32 rounding of the other summation order."""
  p = subprocess.run([sys.executable, "-m", "tests.sharded_check"], cwd=_ROOT, env=_env(4),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["dp"] == {"tokens": True, "latent": True, "image": True}
  assert r["dp_cache_spec"] == "P(None, 'batch')" and r["dp_text_kv_spec"] == "P(None, 'batch')"
  assert not any(r["dp_layer_collectives"].values()), r["dp_layer_collectives"]
  assert r["mp"] == {"tokens": True, "latent": True, "image": True}
  assert r["mp_param_specs"] == {"sa.mat_qkv": "P(None, None, 'model')",
                                 "sa.proj": "P(None, 'model', None)",
                                 "ffn.fc1": "P(None, None, 'model')",
                                 "ffn.fc2": "P(None, 'model', None)", "ada_gss": "P()"}
  assert r["mp_cache_spec"] == "P(None, 'batch', None, 'model')"
  assert r["mp_layer_collectives"]["all-reduce"] == 3  # self-attn, cross-attn, FFN outputs
  # Measured 7.8e-5 against logits up to 2.3 (3.4e-5 relative), from partial sums.
  assert 0 < r["mp_logits_max_abs_diff"] <= 1e-4 * r["mp_logits_max_abs"]


# ------------------------------------------------------------------ helpers, in process


def test_items_from_files_and_classes(tmp_path):
  assert items_lib.parse_classes("0-2,7,10-11", 1000) == [0, 1, 2, 7, 10, 11]
  with pytest.raises(UsageError, match="cannot read 'a'"):
    items_lib.parse_classes("1,a", 1000)
  its = items_lib.class_items("3-4", 2, 1000)
  assert [(i.index, i.line, i.fields) for i in its] == [
      (0, None, {"label": 3}), (1, None, {"label": 3}), (2, None, {"label": 4}),
      (3, None, {"label": 4})]
  f = tmp_path / "labels.txt"
  f.write_text("7\n\n  12 \nseven\n999\n", encoding="utf-8")
  its, bad = items_lib.file_items(str(f), "auto", "var")
  assert [(i.index, i.line, i.fields) for i in its] == [(0, 1, {"label": 7}),
                                                        (1, 3, {"label": 12}),
                                                        (3, 5, {"label": 999})]
  assert bad == [{"line": 4, "item": 2, "error": "not a class id: 'seven'"}]
  j = tmp_path / "p.txt"  # JSONL by request although not named .jsonl
  j.write_text('{"prompt": "a"}\n[1, 2]\n', encoding="utf-8")
  its, bad = items_lib.file_items(str(j), "jsonl", "infinity")
  assert [i.fields for i in its] == [{"prompt": "a"}]
  assert bad == [{"line": 2, "item": 1, "error": "expected a JSON object, got list"}]
  assert items_lib.number_list("cfg", [1, 2.5]) == "1.0,2.5"
  with pytest.raises(items_lib.ItemError, match="cfg must be a number"):
    items_lib.number_list("cfg", [True])


def test_manifest_latest_record_wins_and_merge(tmp_path):
  out = str(tmp_path)
  for i in range(3):
    outputs.save_png(os.path.join(out, f"{i:06d}.png"), np.full((4, 4, 3), i, np.uint8))
  s_old, s_new = {"cfg": 1.5}, {"cfg": 2.0}
  w = manifest.ManifestWriter(out, "manifest.p0-of-2.jsonl")
  w.append({"item": 0, "settings": s_new, "t": 1.0})
  w.append({"item": 2, "settings": s_new, "t": 1.0})
  with pytest.raises(outputs.OutputError, match="another process is writing"):
    manifest.ManifestWriter(out, "manifest.p0-of-2.jsonl")
  w.close()
  w = manifest.ManifestWriter(out, "manifest.p1-of-2.jsonl")
  w.append({"item": 1, "settings": s_old, "t": 1.0})
  w.append({"item": 1, "settings": s_new, "t": 2.0})  # made again with new settings
  w.close()
  with open(os.path.join(out, "manifest.p1-of-2.jsonl"), "a") as f:
    f.write('{"item": 2, "settings": {"cfg"')  # a line cut by a kill
  latest = manifest.latest_records(manifest.read_records(out))
  assert {i: r["settings"] for i, r in latest.items()} == {0: s_new, 1: s_new, 2: s_new}
  assert manifest.describe_changes([(0, s_new, s_old), (1, s_new, s_old), (5, s_new, {})]) == \
      "cfg 1.5 -> 2.0 (items 0-1); cfg null -> 2.0 (item 5)"
  assert manifest.ranges([9, 1, 2, 3, 5]) == "1-3, 5, 9"
  chosen, missing = manifest.merge(out, [(0, s_new), (1, s_new), (2, s_old)],
                                   lambda i, rec: True)
  assert [r["item"] for r in chosen] == [0, 1] and missing == [2]
  assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png",
                                     "manifest.jsonl", "manifest.p0-of-2.jsonl",
                                     "manifest.p1-of-2.jsonl"]  # shards kept: incomplete
  chosen, missing = manifest.merge(out, [(0, s_new), (1, s_new), (2, s_new)],
                                   lambda i, rec: True)
  assert missing == [] and not [f for f in os.listdir(out) if f.startswith("manifest.p")]
  assert [r["item"] for r in _records(tmp_path / "manifest.jsonl")] == [0, 1, 2]


def test_fid_npz_is_written_row_by_row(tmp_path):
  rows = [np.full((3, 5, 3), i, np.uint8) for i in range(4)]
  path = str(tmp_path / "a.npz")
  outputs.save_npz_rows(path, "arr_0", (4, 3, 5, 3), np.uint8, iter(rows))
  with np.load(path) as z:
    assert z.files == ["arr_0"]
    np.testing.assert_array_equal(z["arr_0"], np.stack(rows))
  with pytest.raises(ValueError, match="got 3 rows"):
    outputs.save_npz_rows(str(tmp_path / "b.npz"), "arr_0", (4, 3, 5, 3), np.uint8, rows[:3])
  assert not os.path.exists(tmp_path / "b.npz")
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
  png = tmp_path / "x.png"
  outputs.save_png(str(png), np.zeros((8, 8, 3), np.uint8))
  data = png.read_bytes()
  png.write_bytes(data[:len(data) // 2])
  assert outputs.read_png(str(png)) is None  # a cut PNG is not done


def test_row_shardings_follow_the_declared_axes():
  import jax
  import jax.numpy as jnp
  from sparvar_jax import sharding
  from sparvar_jax.families.infinity import TextContext
  from sparvar_jax.nn.kv_cache import KVCache
  mesh = sharding.make_mesh(jax.devices()[:1])
  cache = KVCache.zeros(2, 4, 10, 8, 16)
  ctx = TextContext(jnp.zeros((4, 32)), jnp.zeros((4, 6, 32)), jnp.zeros((2, 4, 7, 8, 4)),
                    jnp.zeros((2, 4, 7, 8, 4)), jnp.zeros((4, 7), bool))
  P = jax.sharding.PartitionSpec
  specs = sharding.row_specs((ctx, jnp.zeros((4, 3)), cache, None), mesh)
  assert specs[0].ca_k == P(None, "batch", None, None, None)
  assert specs[0].cond_BD == P("batch", None) and specs[1] == P("batch", None)
  assert specs[2].k == P(None, "batch", None, None, None) and specs[3] is None
