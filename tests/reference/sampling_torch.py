"""Our PyTorch statement of the official top-k/top-p filter (VAR models/helpers.py)."""

import torch


def top_k_top_p_filter(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0):
  logits_BlV = logits_BlV.clone()
  if top_k > 0:
    kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
    logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
  if top_p > 0:
    sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
    remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove_sorted[..., -1:] = False
    logits_BlV.masked_fill_(remove_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, remove_sorted),
                            -torch.inf)
  return logits_BlV
