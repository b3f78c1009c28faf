"""Writes this crate's libtch/torch_api_generated.cpp from torch-sys 0.26.0's own (DETGRAFT.md):
the wrappers of functions a supported libtorch series lacks raise an error under an ``#if`` on
``<torch/version.h>``; with every other series they are the generated code unchanged.

    python3 vendor/torch-sys/detgraft_guards.py ~/.cargo/registry/src/*/torch-sys-0.26.0/libtch/torch_api_generated.cpp
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MINOR = "(TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR {})"
# condition, what the error says, the wrappers (found by compiling against each series' headers)
GUARDS = [
    (
        MINOR.format("< 11"),
        "is not in libtorch 2.10",
        [  # added in 2.11
            "atg__use_miopen_ctc_loss",
            "atg__use_miopen_ctc_loss_tensor",
            "atg_miopen_ctc_loss",
            "atg_miopen_ctc_loss_out",
            "atg_miopen_ctc_loss_tensor",
        ],
    ),
    (
        MINOR.format("< 12"),
        "is not in libtorch 2.11",  # nor in 2.10
        [  # added in 2.12 (and one signature changed)
            "atg__flash_attention_forward_no_dropout_inplace",
            "atg__philox_key_fold_in",
            "atg__philox_key_split",
            "atg__philox_normal",
            "atg__philox_normal_",
            "atg__philox_normal_out",
            "atg__philox_uniform",
            "atg__philox_uniform_",
            "atg__philox_uniform_out",
            "atg__scaled_dot_product_attention_math_for_mps",
            "atg__upsample_lanczos2d_aa",
            "atg__upsample_lanczos2d_aa_backward",
            "atg__upsample_lanczos2d_aa_backward_grad_input",
            "atg__upsample_lanczos2d_aa_out",
            "atg__upsample_lanczos2d_aa_vec",
        ],
    ),
    (
        "(TORCH_VERSION_MAJOR > 2 || " + MINOR.format(">= 14") + ")",
        "was removed in libtorch 2.14",
        ["atg_cholesky", "atg_cholesky_out", "atg_qr", "atg_qr_q"],
    ),
]
HEADER = """// detgraft: wrappers of functions that a libtorch series detgraft supports lacks raise an error
// with that series' headers (../DETGRAFT.md; written by ../detgraft_guards.py).
#include <stdexcept>
#include <torch/version.h>
"""


def guard(source: str) -> str:
    include = '#include "torch_api_generated.h"\n'
    assert source.count(include) == 1 and "detgraft" not in source, "give torch-sys 0.26.0's own file"
    source = source.replace(include, include + HEADER, 1)
    for condition, says, names in GUARDS:
        for name in names:
            match = re.search(rf"\n\w+ {name}\([^)]*\) {{\n(?:.*\n)*?\}}\n", source)
            assert match, name
            function = match.group(0)
            body = re.search(r"  PROTECT\(\n(?:.*\n)*?  \)\n", function).group(0)
            call = re.search(r"torch::(\w+)\(|->(\w+)\(", body)
            what = next(g for g in call.groups() if g) if call else name
            throw = f'    throw std::runtime_error("torch::{what} {says}");\n'
            raising = function.replace(body, f"  PROTECT(\n{throw}  )\n")
            source = source.replace(function, f"\n#if {condition}{raising[:-1]}\n#else{function[:-1]}\n#endif\n", 1)
    return source


if __name__ == "__main__":
    original = Path(sys.argv[1]).read_text()
    out = Path(__file__).parent / "libtch" / "torch_api_generated.cpp"
    out.write_text(guard(original))
    print(f"wrote {out}: {sum(len(n) for _, _, n in GUARDS)} wrappers guarded")
