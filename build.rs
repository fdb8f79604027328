//! Build script: links the `attache` binary with `link/startup-first.ld`, which puts the code
//! run at start-up, then the request path, before the rest (an idle process maps a third of
//! what it did; the file says why). Linux only, where the linker is GNU ld or lld.
//! `ATTACHE_LINK_ORDER=off` links in the linker's own order: for callgrind's per-line
//! figures (valgrind reads source lines only for `.text`) and for linkers that take no
//! SECTIONS script (mold).

fn main() {
    println!("cargo:rerun-if-changed=link/startup-first.ld");
    println!("cargo:rerun-if-env-changed=ATTACHE_LINK_ORDER");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let off = std::env::var("ATTACHE_LINK_ORDER").is_ok_and(|v| v == "off");
    if linux && !off {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link/startup-first.ld");
    }
}
