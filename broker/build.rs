//! Builds the syslog shim (src/syslog_shim.c) and exports its symbols from aziotd, so that
//! modules dlopen'ed by a worker (PKCS#11) log through aziotd instead of opening a socket.

fn main() {
    println!("cargo:rerun-if-changed=src/syslog_shim.c");
    // Compact relative relocations (DT_RELR, glibc >= 2.36): ~6900 RELATIVE entries become a
    // 2 KB table, relocated at each of the two execs of a start (broker, worker).
    println!("cargo:rustc-link-arg-bin=aziotd=-Wl,-z,pack-relative-relocs");
    cc::Build::new().file("src/syslog_shim.c").warnings(true).compile("aziot_syslog_shim");
    for symbol in ["openlog", "closelog", "syslog", "vsyslog", "__syslog_chk", "__vsyslog_chk"] {
        // -u: link the shim's definition (nothing in Rust references it); export it dynamically
        // so that a dlopen'ed module binds to it before glibc's.
        println!("cargo:rustc-link-arg-bin=aziotd=-Wl,-u,{symbol}");
        println!("cargo:rustc-link-arg-bin=aziotd=-Wl,--export-dynamic-symbol={symbol}");
    }
}
