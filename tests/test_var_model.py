"""VAR transformer parity: our NNX model against our PyTorch reference and the official
golden outputs (CPU, fp32, relative error <= 1e-5 on logits)."""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.var import convert_var_tree
from sparvar_jax import checkpoint, configs
from sparvar_jax.models.var import VAR, abstract_var, begin_ends, load_var
from tests.conftest import golden_dir
from tests.reference.var_torch import VARTorch, randomize_

TOL = 1e-5
TINY = configs.VAR_TINY  # depth 2, width 128, 2 heads, vocab 512, 256px schedule
TINY_SALN = dataclasses.replace(TINY, shared_aln=True)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_var(cfg: configs.VARConfig, seed: int = 0) -> VARTorch:
  torch.manual_seed(seed)
  m = VARTorch(vocab_size=cfg.vocab_size, cvae=cfg.cvae, num_classes=cfg.num_classes,
               depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
               mlp_ratio=cfg.mlp_ratio, shared_aln=cfg.shared_aln, patch_nums=cfg.patch_nums)
  return randomize_(m.eval(), seed)


def jax_from_state_dict(sd, dtype=jnp.float32) -> VAR:
  sd = {k: v.detach().numpy() if hasattr(v, "detach") else v for k, v in sd.items()}
  cfg, tree = convert_var_tree(sd)
  m = checkpoint.load_into(abstract_var(cfg, dtype), tree)
  # every array is real now (no placeholder left from the abstract model)
  assert not any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(m)))
  return m


def inputs(cfg: configs.VARConfig, B: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, cfg.num_classes + 1, size=B)  # may include the null class
  labels[0] = cfg.num_classes
  x = rng.normal(size=(B, cfg.seq_len - 1, cfg.cvae)).astype(np.float32)
  return labels, x


def torch_teacher(tm: VARTorch, labels, x) -> np.ndarray:
  with torch.no_grad():
    return tm(torch.from_numpy(labels), torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("cfg", [TINY, TINY_SALN], ids=["tiny", "tiny_shared_aln"])
def test_teacher_forced_logits_match_reference(cfg):
  tm = torch_var(cfg)
  m = jax_from_state_dict(tm.state_dict())
  assert m.cfg == cfg
  labels, x = inputs(cfg, 3)
  ref = torch_teacher(tm, labels, x)
  out = nnx.jit(VAR.teacher_forward)(m, jnp.asarray(labels), jnp.asarray(x))
  assert out.dtype == jnp.float32 and out.shape == (3, cfg.seq_len, cfg.vocab_size)
  assert rel_err(out, ref) <= TOL


def _cached_logits_jax(m: VAR, labels, x) -> list[np.ndarray]:
  """Per-scale inference with the preallocated cache, one compiled step per scale."""
  cfg = m.cfg
  B = labels.shape[0]
  step = nnx.jit(VAR.scale_step, static_argnums=1, donate_argnums=4)
  cond = m.cond(jnp.asarray(labels))
  cache = m.init_cache(B)
  assert cache.k.shape == (cfg.depth, B, 768, cfg.num_heads, cfg.head_dim)  # 680 -> 768
  out = []
  for si, (bg, ed) in enumerate(begin_ends(cfg.patch_nums)):
    pn = cfg.patch_nums[si]
    x_BlC = (m.first_input(cond) if si == 0 else
             m.next_input(si, jnp.asarray(x[:, bg - 1:ed - 1]).reshape(B, pn, pn, -1)))
    logits, cache, _ = step(m, si, x_BlC, cond, cache)
    out.append(np.asarray(logits))
  return out


@pytest.mark.parametrize("cfg", [TINY, TINY_SALN], ids=["tiny", "tiny_shared_aln"])
def test_kv_cached_scale_steps_equal_teacher_forcing(cfg):
  tm = torch_var(cfg, seed=3)
  m = jax_from_state_dict(tm.state_dict())
  labels, x = inputs(cfg, 2, seed=4)
  teacher = np.asarray(m.teacher_forward(jnp.asarray(labels), jnp.asarray(x)))
  cached = _cached_logits_jax(m, labels, x)
  ref = torch_teacher(tm, labels, x)
  # the reference's own KV-cached path agrees with its teacher forcing too
  tm.kv_caching(True)
  with torch.no_grad():
    cond = tm.class_emb(torch.from_numpy(labels))
    t_cached = []
    for si, (bg, ed) in enumerate(tm.begin_ends):
      xi = tm.first_input(cond) if si == 0 else tm.next_input(si, torch.from_numpy(
          x[:, bg - 1:ed - 1]))
      t_cached.append(tm.scale_forward(xi, cond).numpy())
  tm.kv_caching(False)
  for si, (bg, ed) in enumerate(begin_ends(cfg.patch_nums)):
    assert rel_err(cached[si], teacher[:, bg:ed]) <= TOL, si
    assert rel_err(cached[si], ref[:, bg:ed]) <= TOL, si
    assert rel_err(t_cached[si], ref[:, bg:ed]) <= TOL, si
  # greedy tokens identical at every position
  np.testing.assert_array_equal(np.concatenate(cached, 1).argmax(-1), ref.argmax(-1))


def test_golden_var_tiny_teacher_logits():
  d = golden_dir("var_tiny")
  from convert.common import load_state_dict
  sd = load_state_dict(os.path.join(d, "var_tiny.pth"))
  m = jax_from_state_dict(sd)
  assert m.cfg == TINY
  g = np.load(os.path.join(d, "golden.npz"))
  out = m.teacher_forward(jnp.asarray(g["labels_B"]), jnp.asarray(g["teacher_input_BLCv"]))
  assert rel_err(out, g["teacher_logits_BLV"]) <= TOL
  np.testing.assert_array_equal(np.asarray(out).argmax(-1),
                                g["teacher_logits_BLV"].argmax(-1))


def test_d16_real_shape_parity():
  """The released d16 shape (1024 wide, 16 heads, 16 blocks, 4096 codes), random weights."""
  cfg = configs.var_config(16)
  torch.set_num_threads(2)
  t0 = time.time()
  tm = torch_var(cfg, seed=5)
  labels, x = inputs(cfg, 1, seed=6)
  ref = torch_teacher(tm, labels, x)
  m = jax_from_state_dict(tm.state_dict())
  del tm
  out = nnx.jit(VAR.teacher_forward)(m, jnp.asarray(labels), jnp.asarray(x))
  assert out.shape == (1, 680, 4096)
  assert rel_err(out, ref) <= TOL
  print(f"d16 parity test body: {time.time() - t0:.1f}s")


def test_bf16_compute_is_close_to_fp32():
  tm = torch_var(TINY, seed=7)
  m32 = jax_from_state_dict(tm.state_dict())
  m16 = jax_from_state_dict(tm.state_dict(), dtype=jnp.bfloat16)
  labels, x = inputs(TINY, 2, seed=8)
  a = m32.teacher_forward(jnp.asarray(labels), jnp.asarray(x))
  b = m16.teacher_forward(jnp.asarray(labels), jnp.asarray(x))
  assert b.dtype == jnp.float32  # logits stay fp32
  assert m16.init_cache(2).k.dtype == jnp.bfloat16
  err = rel_err(b, a)
  assert 0 < err < 3e-2, err


def test_bad_shapes_are_refused():
  m = abstract_var(TINY)  # shapes are checked before any parameter is used
  with pytest.raises(ValueError, match="x_BLCv must be"):
    m.teacher_forward(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 10, 32)))
  cond = jnp.zeros((2, 128))
  with pytest.raises(ValueError, match="scale 1 has 4 tokens"):
    m.scale_step(1, jnp.zeros((2, 9, 128)), cond, m.init_cache(2))
  with pytest.raises(ValueError, match="scale 2 expects 9 tokens"):
    m.next_input(2, jnp.zeros((2, 2, 2, 32)))


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
  def n_eqns(depth):
    cfg = dataclasses.replace(TINY, depth=depth)
    m = abstract_var(cfg)
    gdef, state = nnx.split(m)
    cache = jax.eval_shape(lambda: m.init_cache(2))

    def step(state, x, cond, cache):
      return nnx.merge(gdef, state).scale_step(3, x, cond, cache)

    jaxpr = jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((2, 16, 128), jnp.float32),
                                 jax.ShapeDtypeStruct((2, 128), jnp.float32), cache)
    assert any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)
    return len(jaxpr.jaxpr.eqns)

  assert n_eqns(2) == n_eqns(6)


def test_load_var_refuses_bad_directories(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    load_var(str(tmp_path / "nope"))
  d = tmp_path / "other"
  d.mkdir()
  (d / "config.json").write_text(
      '{"configs": {"t5": {"type": "T5Config"}}, "meta": {}}')
  with pytest.raises(checkpoint.CheckpointError, match="not a converted VAR checkpoint"):
    load_var(str(d))


@pytest.mark.gpu
def test_cudnn_scale_steps_match_xla_in_bf16_on_gpu():
  tm = torch_var(TINY, seed=9)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  cfg, tree = convert_var_tree(sd)
  labels, x = inputs(TINY, 2, seed=10)
  outs = {}
  for impl in ("xla", "cudnn"):
    m = checkpoint.load_into(abstract_var(cfg, jnp.bfloat16, attn_impl=impl), tree)
    outs[impl] = np.concatenate(_cached_logits_jax(m, labels, x), 1)
  assert rel_err(outs["cudnn"], outs["xla"]) < 2e-2
