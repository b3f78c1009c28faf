//! Where the extension and `cargo test` binaries find libtorch at run time, without LD_LIBRARY_PATH:
//! the libtorch folder this build used (cargo test, an editable install), and `$ORIGIN/../torch/lib`,
//! the torch package beside `detgraft/` in an environment a wheel is installed into. (`import
//! detgraft` also imports torch first, which loads libtorch before the extension.)
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
}
