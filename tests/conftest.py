from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_model  # noqa: E402

TINY_BUILDER = f"{Path(__file__).parent / 'tiny_model.py'}:build"


@pytest.fixture
def tiny():
    return tiny_model.build()


@pytest.fixture
def tiny_images():
    return tiny_model.images()


@torch.no_grad()
def detect(model, images):
    model.eval()
    return model([im.to(next(model.parameters()).device) for im in images])


def assert_same_detections(before, after, score_rtol=1e-6):
    """Same boxes and labels, scores equal within score_rtol (relative)."""
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b["labels"].shape[0] > 0, "no detections: the comparison would prove nothing"
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=score_rtol, atol=0)
