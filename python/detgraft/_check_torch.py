"""The torch this environment has must be the one the Rust extension links: checked at import,
before the extension loads, so that a mismatch is an ImportError that says what to install rather
than a crash or an undefined symbol."""

import torch

TORCH_SERIES = "2.13"  # the libtorch that tch 0.26, and so detgraft's Rust core, is built against

if torch.__version__.split("+")[0].rsplit(".", 1)[0] != TORCH_SERIES:
    raise ImportError(
        f"detgraft is built for torch {TORCH_SERIES}.x (its Rust core links libtorch {TORCH_SERIES}), but this "
        f"environment has torch {torch.__version__}: pip install 'torch=={TORCH_SERIES}.*' 'torchvision==0.28.*'"
    )
