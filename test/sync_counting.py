"""A counting stub for the calls that make the host wait for a CUDA device."""
from __future__ import annotations

import torch


class SyncCounter:
    """Counts the calls that synchronise host and device on CUDA (data-dependent sizes,
    copies back, python values of tensors, per-call constant uploads, mask indexing); on CPU
    they are counted all the same, so the CUDA path's count is checked here."""

    METHODS = ("nonzero", "cpu", "item", "tolist", "__bool__", "new_tensor", "masked_select")

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "tensor", "masked_select"):
            monkeypatch.setattr(torch, name, self._counted(f"torch.{name}", getattr(torch, name)))
        getitem = torch.Tensor.__getitem__

        def counted_getitem(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                self.calls["mask indexing"] = self.calls.get("mask indexing", 0) + 1
            return getitem(tensor, index)
        monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)

    def _counted(self, name, real):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)
        return counted
