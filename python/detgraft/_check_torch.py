"""The torch this environment has must be the one the Rust extension links: checked at import,
before the extension loads, so that a mismatch is an ImportError that says what to install rather
than a crash or an undefined symbol.

detgraft builds against every torch series in ``SUPPORTED`` (one tch, 0.26, with the patched
torch-sys in ``vendor/torch-sys``); a build links the one in its environment, and ``_built_for``
(written by ``build.rs``) records which."""

import warnings

import torch

#: torch series -> the torchvision series made for it (None: not released yet)
SUPPORTED = {"2.10": "0.25", "2.11": "0.26", "2.12": "0.27", "2.13": "0.28", "2.14": "0.29", "2.15": None}

try:
    from ._built_for import SERIES as BUILT_FOR
except ImportError:  # a source tree whose extension was never built
    raise ImportError(
        "detgraft's Rust core is not built: pip install --no-build-isolation -e . in an environment with torch "
        f"{', '.join(SUPPORTED)}"
    ) from None

SERIES = ".".join(torch.__version__.split("+")[0].split(".")[:2])  # 2.14.1+cu130, 2.14.0.dev20260101 -> 2.14


def _pins(series: str) -> str:
    vision = SUPPORTED.get(series)
    return f"'torch=={series}.*'" + (f" 'torchvision=={vision}.*'" if vision else "")


if SERIES not in SUPPORTED:
    raise ImportError(
        f"detgraft supports torch {', '.join(SUPPORTED)}; this environment has torch {torch.__version__}: "
        f"pip install {_pins(BUILT_FOR if BUILT_FOR in SUPPORTED else '2.13')}"
    )
if BUILT_FOR == "unknown":  # built against a libtorch folder that states no version
    warnings.warn(
        f"detgraft's Rust core was built against a libtorch of unknown version: it must be torch {SERIES}'s",
        stacklevel=2,
    )
elif SERIES != BUILT_FOR:
    raise ImportError(
        f"this detgraft was built for torch {BUILT_FOR}.x (its Rust core links libtorch {BUILT_FOR}), but this "
        f"environment has torch {torch.__version__}: install the detgraft wheel for torch {SERIES}, or build it "
        "here (pip install --no-build-isolation --force-reinstall <detgraft source>), or pip install "
        f"{_pins(BUILT_FOR)}"
    )
