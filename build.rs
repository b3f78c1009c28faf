//! Lets `cargo test` binaries find libtorch at run time without LD_LIBRARY_PATH.
//! The Python extension needs no such path: `import torch` has loaded libtorch before it.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
