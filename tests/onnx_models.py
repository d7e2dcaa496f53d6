"""Small torch models exported to ONNX at test time (never committed).

``TinyViT``: conv patch embedding, class token (dynamic-batch shape plumbing),
LayerNorm, softmax attention with a fused qkv projection (Split), erf-GELU
MLP, a BatchNorm1d over channels (the vit benchmark's LayerNorm stand-in),
ReLU, mean pooling and the class token's slice, a linear head.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

VIT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "vnncomp2023-vit")


class TinyViT(nn.Module):
    def __init__(self, d: int = 12, heads: int = 2, classes: int = 4, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):    # seeded weights; the global random state is left as it was
            torch.manual_seed(seed)
            self.d, self.heads = d, heads
            self.patch = nn.Conv2d(3, d, 4, stride=4)                  # (B, 3, 8, 8) -> (B, d, 2, 2)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
            self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.5)
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.bn = nn.BatchNorm1d(d)
            self.fc1 = nn.Linear(d, 2 * d)
            self.fc2 = nn.Linear(2 * d, d)
            self.head = nn.Linear(d, classes)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):                                          # (B, 3, 8, 8) -> (B, classes)
        B = x.shape[0]
        p = self.patch(x).flatten(2).transpose(1, 2)               # (B, 4, d)
        h = torch.cat([self.cls.expand(B, -1, -1), p], dim=1) + self.pos   # (B, 5, d)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        dh = self.d // self.heads
        sh = lambda t: t.reshape(B, -1, self.heads, dh).transpose(1, 2)    # (B, H, T, dh)
        att = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(dh), dim=-1)
        o = (att @ sh(v)).transpose(1, 2).reshape(B, -1, self.d)
        h = h + self.proj(o)
        n = self.bn(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.fc2(nn.functional.gelu(self.fc1(n)))
        pooled = torch.relu(h).mean(dim=1) + h[:, 0]               # (B, d)
        return self.head(pooled)


def export(model: nn.Module, path: str, opset: int = 17, shape=(1, 3, 8, 8)) -> str:
    """torch.onnx.export (TorchScript exporter) with a dynamic batch axis, as the vit files have."""
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def vit_onnx(name: str) -> str:
    return os.path.join(VIT_DIR, "onnx", f"{name}.onnx.gz")
