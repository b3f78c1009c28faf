//! Where the extension and `cargo test` binaries find libtorch at run time, without LD_LIBRARY_PATH:
//! the libtorch folder this build used (cargo test, an editable install), and `$ORIGIN/../torch/lib`,
//! the torch package beside `detgraft/` in an environment a wheel is installed into. (`import
//! detgraft` also imports torch first, which loads libtorch before the extension.)
//!
//! It also writes `python/detgraft/_built_for.py`: the torch series this build links (torch-sys
//! reports the version it found), which `detgraft._check_torch` compares with the imported torch
//! before the extension loads.
use std::path::Path;

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
    let version =
        std::env::var("DEP_TCH_LIBTORCH_VERSION").unwrap_or_else(|_| "unknown".to_owned());
    let series = version.split('.').take(2).collect::<Vec<_>>().join("."); // 2.14.1, 2.14.0.dev20260101 -> 2.14
    let text = format!(
        "# Written by build.rs: the torch series detgraft's Rust core was built against.\nSERIES = \"{series}\"\n"
    );
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/detgraft/_built_for.py");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&file, text).expect("cannot write python/detgraft/_built_for.py");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_VERSION");
    println!("cargo:rerun-if-changed=build.rs");
}
