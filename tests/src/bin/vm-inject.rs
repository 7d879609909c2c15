//! vm-inject: makes a live worker run a syscall its seccomp filter forbids (the ptrace injection
//! of tests/tests/inject, shared, not copied), for the VM suite's check that the broker names a
//! seccomp death under the installed unit (tests/vm/guest.sh; issue 10 §2).
//!
//! usage: vm-inject WORKER_PID    (root; prints the syscall it injected)

#[path = "../../tests/inject/mod.rs"]
mod inject;

fn main() {
    let Some(pid) = std::env::args().nth(1).and_then(|a| a.parse::<i32>().ok()) else {
        eprintln!("usage: vm-inject WORKER_PID");
        std::process::exit(64);
    };
    inject::inject_forbidden_syscall(pid);
    let (nr, name) = inject::FORBIDDEN;
    println!("injected syscall {nr} ({name}) into {pid}");
}
