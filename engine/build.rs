//! The dynamic engine must never be unmapped: OpenSSL keeps pointers to its ex-data callbacks
//! and methods after `ENGINE_free` may `dlclose` it, and Rust code is not unload-safe. DF_1_NODELETE
//! makes `dlclose` a no-op for the cdylib (the rlib is unaffected).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
